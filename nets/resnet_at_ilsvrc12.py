"""Model helper: ResNet-18/34/50/101 on ILSVRC-12 TFRecords (PocketFlow's nets/resnet_at_ilsvrc12.py)."""

from nets import imagenet_resnet
from nets.data import ilsvrc12
from nets.ilsvrc12_helper import Ilsvrc12ModelHelper


class ModelHelper(Ilsvrc12ModelHelper):
    """PocketFlow's ResNet schedule: 100 epochs, rate x0.1 at epochs 30, 60, 80 and 90."""

    base_epochs = 100

    def __init__(self, data_dir, resnet_size=18, image_size=ilsvrc12.DEFAULT_IMAGE_SIZE, batch_size_norm=256,
                 batch_size=64, batch_size_eval=100, lrn_rate_init=0.1, momentum=0.9, loss_w_dcy=1e-4,
                 nb_epochs_rat=1.0, train_subset=None, eval_subset=None, seed=None):
        """Validates resnet_size (18, 34, 50, 101) and checks the records in data_dir."""
        if resnet_size not in imagenet_resnet.ALLOWED_SIZES:
            raise ValueError('resnet_size %r is not supported for ILSVRC-12; allowed values: %s'
                             % (resnet_size, ', '.join(str(s) for s in imagenet_resnet.ALLOWED_SIZES)))
        self.resnet_size = resnet_size
        super().__init__(data_dir, image_size, batch_size_norm, batch_size, batch_size_eval, lrn_rate_init,
                         momentum, loss_w_dcy, nb_epochs_rat, train_subset, eval_subset, seed)

    def _forward(self, inputs, is_training):
        return imagenet_resnet.forward_imagenet_resnet(inputs, is_training, self.resnet_size, self.nb_classes)

    def setup_lrn_rate(self, global_step):
        """(learning-rate tensor, nb_iters) of PocketFlow's piecewise-constant ResNet schedule."""
        return self.step_schedule(global_step)

    @property
    def model_name(self):
        """'resnet_<depth>'."""
        return 'resnet_%d' % self.resnet_size
