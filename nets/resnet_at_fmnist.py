"""Model helper: CIFAR-style ResNet on Fashion-MNIST (28x28x1)."""

from nets import resnet
from nets.data import fmnist, pipeline
from nets.model_helper import ClassifierModelHelper


class ModelHelper(ClassifierModelHelper):
    """ResNet-N on Fashion-MNIST with a short cosine schedule sized for a 2-core CPU."""

    base_epochs = 3
    lrn_rate_schedule = 'cosine'
    train_preprocess = staticmethod(pipeline.fmnist_train_preprocess)
    eval_preprocess = staticmethod(pipeline.fmnist_eval_preprocess)

    def __init__(self, data_dir=None, resnet_size=20, batch_size=128, batch_size_eval=500,
                 lrn_rate_init=0.1, momentum=0.9, loss_w_dcy=2e-4, nb_epochs_rat=1.0,
                 train_subset=None, eval_subset=None, seed=None):
        """Validates resnet_size and loads Fashion-MNIST from data_dir (default system copy)."""
        if resnet_size not in resnet.ALLOWED_SIZES:
            raise ValueError('resnet_size %r is not supported; allowed values: %s'
                             % (resnet_size, ', '.join(str(s) for s in resnet.ALLOWED_SIZES)))
        self.data_dir = data_dir
        self.resnet_size = resnet_size
        super().__init__(batch_size, batch_size_eval, lrn_rate_init, momentum, loss_w_dcy,
                         nb_epochs_rat, train_subset, eval_subset, seed)

    def _load_data(self):
        return fmnist.load_fmnist(self.data_dir)

    def _forward(self, inputs, is_training):
        return resnet.forward_resnet(inputs, is_training, self.resnet_size, self.nb_classes)

    @property
    def model_name(self):
        """'resnet_<depth>'."""
        return 'resnet_%d' % self.resnet_size

    @property
    def dataset_name(self):
        """'fmnist'."""
        return 'fmnist'
