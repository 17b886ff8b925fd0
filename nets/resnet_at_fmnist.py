"""Model helper: CIFAR-style ResNet on Fashion-MNIST (28x28x1)."""

from nets.model_helper import FashionMnistData, ResNetModelHelper


class ModelHelper(FashionMnistData, ResNetModelHelper):
    """ResNet-N on Fashion-MNIST with a short cosine schedule sized for a 2-core CPU."""

    base_epochs = 3
    lrn_rate_schedule = 'cosine'

    def __init__(self, data_dir=None, resnet_size=20, batch_size=128, batch_size_eval=500,
                 lrn_rate_init=0.1, momentum=0.9, loss_w_dcy=2e-4, nb_epochs_rat=1.0,
                 train_subset=None, eval_subset=None, seed=None):
        """Validates resnet_size and loads Fashion-MNIST from data_dir (default system copy)."""
        super().__init__(data_dir, resnet_size, batch_size, batch_size_eval, lrn_rate_init, momentum,
                         loss_w_dcy, nb_epochs_rat, train_subset, eval_subset, seed)
