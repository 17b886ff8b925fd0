"""The ModelHelper shared by the ILSVRC-12 networks: TFRecord data, top-5 accuracy, PocketFlow's schedules."""

import tensorflow as tf

from nets.data import ilsvrc12
from nets.model_helper import ClassifierModelHelper

tf1 = tf.compat.v1


def piecewise_lrn_rate(global_step, lrn_rate, nb_iters_per_epoch, boundary_epochs, decay_rates):
    """PocketFlow's piecewise-constant schedule: lrn_rate * decay_rates[i] after boundary_epochs[i-1].

    Args:
      global_step: integer step tensor.
      lrn_rate: the scaled initial learning rate.
      nb_iters_per_epoch: float iterations per epoch.
      boundary_epochs: epochs (already scaled by nb_epochs_rat) where the rate changes.
      decay_rates: len(boundary_epochs) + 1 factors.
    Returns:
      float32 scalar tensor.
    """
    bounds = [int(nb_iters_per_epoch * epoch) for epoch in boundary_epochs]
    values = [lrn_rate * rate for rate in decay_rates]
    return tf.cast(tf1.train.piecewise_constant(tf.cast(global_step, tf.int64), bounds, values), tf.float32)


def exponential_lrn_rate(global_step, lrn_rate, decay_iters, decay_rate):
    """PocketFlow's staircase exponential decay: lrn_rate * decay_rate ** floor(step / decay_iters)."""
    exponent = tf.floor(tf.cast(global_step, tf.float32) / float(max(1, decay_iters)))
    return lrn_rate * tf.pow(decay_rate, exponent)


class Ilsvrc12ModelHelper(ClassifierModelHelper):
    """A network on ILSVRC-12 TFRecords; subclasses give _forward, model_name and the schedule.

    The learning rate follows PocketFlow: lrn_rate_init * batch_size / batch_size_norm (per worker; the
    learners multiply it by the number of workers, giving PocketFlow's global-batch scaling).
    """

    nb_classes = ilsvrc12.NB_CLASSES
    train_preprocess = staticmethod(ilsvrc12.normalize)
    eval_preprocess = staticmethod(ilsvrc12.normalize)

    def __init__(self, data_dir, image_size, batch_size_norm, batch_size, batch_size_eval, lrn_rate_init, momentum,
                 loss_w_dcy, nb_epochs_rat, train_subset, eval_subset, seed):
        """Checks the records in data_dir (see nets.data.ilsvrc12); image_size is the side the model reads."""
        if batch_size_norm is None or not batch_size_norm > 0:
            raise ValueError('batch_size_norm %r is not valid; expected a positive number' % (batch_size_norm,))
        self.data_dir = data_dir
        self.image_size = int(image_size)
        self.batch_size_norm = float(batch_size_norm)
        super().__init__(batch_size, batch_size_eval, lrn_rate_init, momentum, loss_w_dcy, nb_epochs_rat,
                         train_subset, eval_subset, seed)

    def _load_data(self):
        return ilsvrc12.scan_ilsvrc12(self.data_dir, self.image_size)

    @property
    def skipped_images(self):
        """{file: records skipped so far as undecodable} over every pipeline of this helper."""
        return dict(self._data.skipped.by_file)

    def build_dataset_train(self, skip_batches=0):
        """(images, labels) of this worker: its slice of every global batch, decoded by this worker only.

        Returns:
          images float32 [<=batch_size, S, S, 3] (short only when undecodable records were skipped), labels int64.
        """
        ds = self._data.train_dataset(self.global_batch_size, type(self).train_preprocess, seed=self.seed,
                                      skip_batches=skip_batches, shard=self.shard)
        return tf1.data.make_one_shot_iterator(ds).get_next()

    def calc_loss(self, labels, logits, trainable_vars):
        """The classifier loss, top-1 'accuracy' and 'top5_accuracy' (the label among the 5 largest logits)."""
        loss, metrics = super().calc_loss(labels, logits, trainable_vars)
        in_top5 = tf.nn.in_top_k(predictions=logits, targets=tf.cast(labels, tf.int32), k=5)
        metrics['top5_accuracy'] = tf.reduce_mean(tf.cast(in_top5, tf.float32))
        return loss, metrics

    def scaled_lrn_rate(self):
        """lrn_rate_init * batch_size / batch_size_norm (PocketFlow's linear scaling)."""
        return self.lrn_rate_init * self.batch_size / self.batch_size_norm

    def step_schedule(self, global_step, boundary_epochs=(30, 60, 80, 90),
                      decay_rates=(1.0, 0.1, 0.01, 0.001, 0.0001)):
        """PocketFlow's ResNet / MobileNet v1 schedule, epochs scaled by nb_epochs_rat; returns (rate, nb_iters)."""
        epochs = [epoch * self.nb_epochs_rat for epoch in boundary_epochs]
        per_epoch = float(self.n_train) / self.global_batch_size
        return (piecewise_lrn_rate(global_step, self.scaled_lrn_rate(), per_epoch, epochs, decay_rates),
                self.nb_iters_train())

    @property
    def dataset_name(self):
        """'ilsvrc_12'."""
        return 'ilsvrc_12'
