"""Model helper: CIFAR-style ResNet on CIFAR-10 (binary release)."""

from nets.data import cifar10, pipeline
from nets.model_helper import ResNetModelHelper


class ModelHelper(ResNetModelHelper):
    """ResNet-N on CIFAR-10, He et al.'s budget: ~64k iterations at batch 128, lr x0.1 at 50%/75%."""

    base_epochs = 164
    lrn_rate_schedule = 'step'
    train_preprocess = staticmethod(pipeline.cifar10_train_preprocess)
    eval_preprocess = staticmethod(pipeline.cifar10_eval_preprocess)

    def __init__(self, data_dir, resnet_size=20, batch_size=128, batch_size_eval=100,
                 lrn_rate_init=0.1, momentum=0.9, loss_w_dcy=2e-4, nb_epochs_rat=1.0,
                 train_subset=None, eval_subset=None, seed=None):
        """Validates resnet_size and checks the CIFAR-10 files in data_dir (read later, as batches stream)."""
        super().__init__(data_dir, resnet_size, batch_size, batch_size_eval, lrn_rate_init, momentum,
                         loss_w_dcy, nb_epochs_rat, train_subset, eval_subset, seed)

    def _load_data(self):
        return cifar10.scan_cifar10(self.data_dir)

    @property
    def dataset_name(self):
        """'cifar_10'."""
        return 'cifar_10'
