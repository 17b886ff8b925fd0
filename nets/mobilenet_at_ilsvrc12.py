"""Model helper: MobileNet v1/v2 on ILSVRC-12 TFRecords (PocketFlow's nets/mobilenet_at_ilsvrc12.py)."""

from nets import mobilenet
from nets.data import ilsvrc12
from nets.ilsvrc12_helper import Ilsvrc12ModelHelper, exponential_lrn_rate

# PocketFlow's schedules: v1 100 epochs piecewise constant; v2 412 epochs, x0.98^2.5 every 2.5 epochs.
V1_EPOCHS = 100
V2_EPOCHS = 412
V2_DECAY_EPOCHS = 2.5
V2_DECAY_RATE = 0.98 ** V2_DECAY_EPOCHS


class ModelHelper(Ilsvrc12ModelHelper):
    """MobileNet v1 or v2 with PocketFlow's defaults (rate 0.045 at batch 96, decay 4e-5)."""

    def __init__(self, data_dir, mobilenet_version=1, mobilenet_depth_mult=1.0,
                 image_size=ilsvrc12.DEFAULT_IMAGE_SIZE, batch_size_norm=96, batch_size=64, batch_size_eval=100,
                 lrn_rate_init=0.045, momentum=0.9, loss_w_dcy=4e-5, nb_epochs_rat=1.0, train_subset=None,
                 eval_subset=None, seed=None):
        """Validates the version (1, 2) and depth multiplier (> 0) and checks the records in data_dir."""
        if mobilenet_version not in mobilenet.ALLOWED_VERSIONS:
            raise ValueError('mobilenet_version %r is not supported; allowed values: 1, 2' % (mobilenet_version,))
        if not mobilenet_depth_mult > 0:
            raise ValueError('mobilenet_depth_mult %r is not valid; expected a positive number'
                             % (mobilenet_depth_mult,))
        self.mobilenet_version = int(mobilenet_version)
        self.mobilenet_depth_mult = float(mobilenet_depth_mult)
        self.base_epochs = V1_EPOCHS if self.mobilenet_version == 1 else V2_EPOCHS
        super().__init__(data_dir, image_size, batch_size_norm, batch_size, batch_size_eval, lrn_rate_init,
                         momentum, loss_w_dcy, nb_epochs_rat, train_subset, eval_subset, seed)

    def _forward(self, inputs, is_training):
        return mobilenet.forward_mobilenet(inputs, is_training, self.mobilenet_version, self.mobilenet_depth_mult,
                                          self.nb_classes)

    def setup_lrn_rate(self, global_step):
        """(learning-rate tensor, nb_iters): v1 piecewise constant, v2 staircase exponential decay."""
        if self.mobilenet_version == 1:
            return self.step_schedule(global_step)
        decay_iters = int(self.n_train * V2_DECAY_EPOCHS * self.nb_epochs_rat / self.global_batch_size)
        return (exponential_lrn_rate(global_step, self.scaled_lrn_rate(), decay_iters, V2_DECAY_RATE),
                self.nb_iters_train())

    @property
    def model_name(self):
        """'mobilenet_v<version>', with '_x<multiplier>' unless the multiplier is 1."""
        name = 'mobilenet_v%d' % self.mobilenet_version
        return name if self.mobilenet_depth_mult == 1.0 else '%s_x%g' % (name, self.mobilenet_depth_mult)
