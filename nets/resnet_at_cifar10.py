"""Model helper: CIFAR-style ResNet on CIFAR-10 (binary release)."""

from nets import resnet
from nets.data import cifar10, pipeline
from nets.model_helper import ClassifierModelHelper


class ModelHelper(ClassifierModelHelper):
    """ResNet-N on CIFAR-10, He et al.'s budget: ~64k iterations at batch 128, lr x0.1 at 50%/75%."""

    base_epochs = 164
    lrn_rate_schedule = 'step'
    train_preprocess = staticmethod(pipeline.cifar10_train_preprocess)
    eval_preprocess = staticmethod(pipeline.cifar10_eval_preprocess)

    def __init__(self, data_dir, resnet_size=20, batch_size=128, batch_size_eval=100,
                 lrn_rate_init=0.1, momentum=0.9, loss_w_dcy=2e-4, nb_epochs_rat=1.0,
                 train_subset=None, eval_subset=None, seed=None):
        """Validates resnet_size and loads CIFAR-10 from data_dir."""
        if resnet_size not in resnet.ALLOWED_SIZES:
            raise ValueError('resnet_size %r is not supported; allowed values: %s'
                             % (resnet_size, ', '.join(str(s) for s in resnet.ALLOWED_SIZES)))
        self.data_dir = data_dir
        self.resnet_size = resnet_size
        super().__init__(batch_size, batch_size_eval, lrn_rate_init, momentum, loss_w_dcy,
                         nb_epochs_rat, train_subset, eval_subset, seed)

    def _load_data(self):
        return cifar10.load_cifar10(self.data_dir)

    def _forward(self, inputs, is_training):
        return resnet.forward_resnet(inputs, is_training, self.resnet_size, self.nb_classes)

    @property
    def model_name(self):
        """'resnet_<depth>'."""
        return 'resnet_%d' % self.resnet_size

    @property
    def dataset_name(self):
        """'cifar_10'."""
        return 'cifar_10'
