"""Model helpers in PocketFlow's style: one object per (network, data set) pair.

A learner builds its training graph and its evaluation graph in separate tf.Graphs by
calling the same helper; all model variables live under the MODEL_SCOPE variable scope
so a checkpoint written from one graph restores into the other.
"""

import abc
import math

import tensorflow as tf

from nets import resnet
from nets.data import fmnist, pipeline

tf1 = tf.compat.v1

MODEL_SCOPE = 'model'


class AbstractModelHelper(abc.ABC):
    """Interface a learner uses to build datasets, networks, losses and learning rates."""

    @abc.abstractmethod
    def build_dataset_train(self, skip_batches=0):
        """Returns (images, labels) tensors of an endless shuffled training stream.

        skip_batches: start that many batches into the stream (a resumed run sees the batches an
        uninterrupted one would).
        """

    @abc.abstractmethod
    def build_dataset_eval(self):
        """Returns (images, labels) tensors of one in-order pass over the evaluation set."""

    @abc.abstractmethod
    def forward_train(self, inputs):
        """Builds the network in training mode; returns logits."""

    @abc.abstractmethod
    def forward_eval(self, inputs):
        """Builds the network in inference mode; returns logits."""

    @abc.abstractmethod
    def calc_loss(self, labels, logits, trainable_vars):
        """Returns (loss tensor, dict of metric tensors including 'loss' and 'accuracy')."""

    @abc.abstractmethod
    def setup_lrn_rate(self, global_step):
        """Returns (learning-rate tensor, total number of training iterations)."""

    @property
    @abc.abstractmethod
    def model_name(self):
        """Short name of the network, e.g. 'resnet_20'."""

    @property
    @abc.abstractmethod
    def dataset_name(self):
        """Short name of the data set, e.g. 'cifar_10'."""


class ClassifierModelHelper(AbstractModelHelper):
    """Shared implementation for image classifiers; the data comes from a source _load_data() returns.

    Subclasses set the class attributes below and implement _forward(inputs, is_training)
    and _load_data() (returning a data source: n_train, n_eval, limited(), train_dataset(),
    eval_dataset(), as pipeline.ArrayData and cifar10.Cifar10Files provide). No source puts the
    data into the graph.
    """

    nb_classes = 10
    base_epochs = None          # epochs of the model's standard budget (nb_epochs_rat = 1)
    lrn_rate_schedule = 'cosine'  # 'cosine' (with warm-up) or 'step' (x0.1 at 50% and 75%)
    warmup_ratio = 0.02         # fraction of iterations with linearly rising learning rate
    train_preprocess = None
    eval_preprocess = None

    def __init__(self, batch_size, batch_size_eval, lrn_rate_init, momentum, loss_w_dcy,
                 nb_epochs_rat, train_subset, eval_subset, seed):
        """Loads and validates the data set; no graph is touched.

        Args:
          batch_size: training batch size.
          batch_size_eval: evaluation batch size.
          lrn_rate_init: peak learning rate.
          momentum: momentum coefficient a learner should use with this schedule.
          loss_w_dcy: weight-decay coefficient; loss adds loss_w_dcy/2 * sum of squared weights.
          nb_epochs_rat: multiplier applied to base_epochs to get the training budget.
          train_subset: if set, use only the first train_subset training examples.
          eval_subset: if set, use only the first eval_subset evaluation examples.
          seed: optional shuffle seed.
        """
        for name, value in (('batch_size', batch_size), ('batch_size_eval', batch_size_eval)):
            if int(value) <= 0:
                raise ValueError('%s must be a positive integer, got %r' % (name, value))
        if nb_epochs_rat <= 0:
            raise ValueError('nb_epochs_rat must be positive, got %r' % (nb_epochs_rat,))
        self.batch_size = int(batch_size)
        self.batch_size_eval = int(batch_size_eval)
        self.lrn_rate_init = float(lrn_rate_init)
        self.momentum = float(momentum)
        self.loss_w_dcy = float(loss_w_dcy)
        self.nb_epochs_rat = float(nb_epochs_rat)
        self.seed = seed
        for name, limit in (('train_subset', train_subset), ('eval_subset', eval_subset)):
            if limit is not None and int(limit) <= 0:
                raise ValueError('%s must be a positive integer, got %d' % (name, int(limit)))
        self._data = self._load_data().limited(train_subset, eval_subset)
        if self.n_train < self.batch_size:
            raise ValueError('only %d training examples, fewer than one batch of %d'
                             % (self.n_train, self.batch_size))
        self.eval_init_op = None
        self.shard = (0, 1)  # (this worker, number of workers)

    def shard_training_data(self, index, count):
        """Train as worker `index` of `count`: each reads its slice of every global batch of count x batch_size.

        Raises:
          ValueError when the training set holds fewer examples than one global batch.
        """
        if self.n_train < self.batch_size * count:
            raise ValueError('only %d training examples, fewer than one global batch of %d workers x %d'
                             % (self.n_train, count, self.batch_size))
        self.shard = (int(index), int(count))

    @property
    def global_batch_size(self):
        """Examples of one training step over all workers."""
        return self.batch_size * self.shard[1]

    @abc.abstractmethod
    def _load_data(self):
        """Checks the data set and returns its source: a pipeline.ArrayData or a cifar10.Cifar10Files."""

    @abc.abstractmethod
    def _forward(self, inputs, is_training):
        """Builds the network (inside MODEL_SCOPE); returns logits."""

    @property
    def n_train(self):
        """Number of training examples in use."""
        return self._data.n_train

    @property
    def n_eval(self):
        """Number of evaluation examples in use."""
        return self._data.n_eval

    @property
    def nb_eval_batches(self):
        """Number of batches in one evaluation pass (the last may be partial)."""
        return pipeline.nb_eval_batches(self.n_eval, self.batch_size_eval)

    @property
    def nb_iters_per_epoch(self):
        """Training iterations per epoch (partial batches are dropped)."""
        return self.n_train // self.global_batch_size

    def build_dataset_train(self, skip_batches=0):
        """Returns (images, labels) tensors from a one-shot iterator over an endless stream.

        Args:
          skip_batches: start that many batches into the (seeded) stream, e.g. the global step of a
            resumed run; cheap, the skip happens before any preprocessing.
        Returns:
          images float32 [batch_size,H,W,C], labels int64 [batch_size].
        """
        ds = self._data.train_dataset(self.global_batch_size, type(self).train_preprocess, seed=self.seed,
                                      skip_batches=skip_batches)
        ds = pipeline.shard_batches(ds, *self.shard)
        return tf1.data.make_one_shot_iterator(ds).get_next()

    def build_dataset_eval(self):
        """Returns (images, labels) tensors for one in-order pass over the evaluation set.

        The iterator is initializable: run self.eval_init_op (set by this call) before each
        pass, then fetch nb_eval_batches times or until tf.errors.OutOfRangeError.
        Returns:
          images float32 [<=batch_size_eval,H,W,C], labels int64 [<=batch_size_eval].
        """
        ds = self._data.eval_dataset(self.batch_size_eval, type(self).eval_preprocess)
        iterator = tf1.data.make_initializable_iterator(ds)
        self.eval_init_op = iterator.initializer
        return iterator.get_next()

    def forward_train(self, inputs):
        """Builds the network in training mode under MODEL_SCOPE; returns logits."""
        with tf1.variable_scope(MODEL_SCOPE, reuse=tf1.AUTO_REUSE):
            return self._forward(inputs, is_training=True)

    def forward_eval(self, inputs):
        """Builds the network in inference mode under MODEL_SCOPE; returns logits."""
        with tf1.variable_scope(MODEL_SCOPE, reuse=tf1.AUTO_REUSE):
            return self._forward(inputs, is_training=False)

    def calc_loss(self, labels, logits, trainable_vars):
        """Cross-entropy plus weight decay, and metrics.

        The decay term is loss_w_dcy * sum(tf.nn.l2_loss(w)) = loss_w_dcy/2 * sum(w**2), over
        trainable variables whose names end in 'weights' (PocketFlow's convention).
        Args:
          labels: int [N] class ids.
          logits: float [N, nb_classes].
          trainable_vars: variables to consider for weight decay.
        Returns:
          (loss scalar, {'loss': loss, 'accuracy': accuracy, 'cross_entropy': ce}).
        """
        labels = tf.cast(labels, tf.int64)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=logits))
        decayed = [v for v in trainable_vars if v.op.name.endswith('weights')]
        loss = ce
        if decayed and self.loss_w_dcy:
            loss = ce + self.loss_w_dcy * tf.add_n([tf.nn.l2_loss(v) for v in decayed])
        correct = tf.equal(tf.argmax(logits, axis=1), labels)
        accuracy = tf.reduce_mean(tf.cast(correct, tf.float32))
        return loss, {'loss': loss, 'accuracy': accuracy, 'cross_entropy': ce}

    def nb_iters_train(self):
        """Iterations of the budget: ceil(nb_epochs_rat * base_epochs * n_train / global batch size)."""
        return max(1, int(math.ceil(self.nb_epochs_rat * self.base_epochs * self.n_train
                                    / self.global_batch_size)))

    def setup_lrn_rate(self, global_step):
        """Learning-rate schedule over the training budget.

        'cosine': linear warm-up over warmup_ratio of the iterations, then cosine decay to 0.
        'step': constant, multiplied by 0.1 at 50% and again at 75% of the iterations.
        Args:
          global_step: integer step tensor.
        Returns:
          (float32 learning-rate tensor, nb_iters int).
        """
        nb_iters = self.nb_iters_train()
        return lrn_rate_for_step(global_step, nb_iters, self.lrn_rate_init,
                                 self.lrn_rate_schedule, self.warmup_ratio), nb_iters


def lrn_rate_for_step(global_step, nb_iters, lrn_rate_init, schedule='cosine', warmup_ratio=0.0):
    """Learning rate at global_step for a budget of nb_iters iterations.

    Args:
      global_step: integer step tensor.
      nb_iters: total iterations.
      lrn_rate_init: peak learning rate.
      schedule: 'cosine' or 'step'.
      warmup_ratio: fraction of iterations of linear warm-up (cosine only).
    Returns:
      float32 scalar tensor.
    """
    step = tf.cast(global_step, tf.float32)
    if schedule == 'step':
        bounds = [int(nb_iters * 0.5), int(nb_iters * 0.75)]
        values = [lrn_rate_init, lrn_rate_init * 0.1, lrn_rate_init * 0.01]
        return tf.cast(tf1.train.piecewise_constant(tf.cast(global_step, tf.int64), bounds, values),
                       tf.float32)
    if schedule != 'cosine':
        raise ValueError("schedule %r is not supported; allowed: 'cosine', 'step'" % (schedule,))
    warmup = float(max(1, int(nb_iters * warmup_ratio))) if warmup_ratio > 0 else 0.0
    decay_len = max(1.0, nb_iters - warmup)
    progress = tf.clip_by_value((step - warmup) / decay_len, 0.0, 1.0)
    cosine = 0.5 * lrn_rate_init * (1.0 + tf.cos(math.pi * progress))
    if not warmup:
        return cosine
    return tf.where(step < warmup, lrn_rate_init * (step + 1.0) / warmup, cosine)


class ResNetModelHelper(ClassifierModelHelper):
    """A CIFAR-style ResNet of depth resnet_size on any data set; subclasses give the data."""

    def __init__(self, data_dir, resnet_size, batch_size, batch_size_eval, lrn_rate_init, momentum,
                 loss_w_dcy, nb_epochs_rat, train_subset, eval_subset, seed):
        """Validates resnet_size, then loads the data set from data_dir (see ClassifierModelHelper)."""
        if resnet_size not in resnet.ALLOWED_SIZES:
            raise ValueError('resnet_size %r is not supported; allowed values: %s'
                             % (resnet_size, ', '.join(str(s) for s in resnet.ALLOWED_SIZES)))
        self.data_dir = data_dir
        self.resnet_size = resnet_size
        super().__init__(batch_size, batch_size_eval, lrn_rate_init, momentum, loss_w_dcy,
                         nb_epochs_rat, train_subset, eval_subset, seed)

    def _forward(self, inputs, is_training):
        return resnet.forward_resnet(inputs, is_training, self.resnet_size, self.nb_classes)

    @property
    def model_name(self):
        """'resnet_<depth>'."""
        return 'resnet_%d' % self.resnet_size


class FashionMnistData:
    """Mixin of the Fashion-MNIST helpers: the data set (from self.data_dir, default the system copy), its
    preprocessing and its name; put it before the helper's base class."""

    train_preprocess = staticmethod(pipeline.fmnist_train_preprocess)
    eval_preprocess = staticmethod(pipeline.fmnist_eval_preprocess)

    def _load_data(self):
        return pipeline.ArrayData(**fmnist.load_fmnist(self.data_dir))

    @property
    def dataset_name(self):
        """'fmnist'."""
        return 'fmnist'
