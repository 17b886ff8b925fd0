"""Model helper: PocketFlow's small ConvNet on Fashion-MNIST."""

from nets import convnet
from nets.model_helper import FashionMnistData, ClassifierModelHelper


class ModelHelper(FashionMnistData, ClassifierModelHelper):
    """ConvNet (2 conv + 2 fc) on Fashion-MNIST with a short cosine schedule."""

    base_epochs = 3
    lrn_rate_schedule = 'cosine'

    def __init__(self, data_dir=None, batch_size=128, batch_size_eval=500, lrn_rate_init=0.01,
                 momentum=0.9, loss_w_dcy=5e-4, nb_epochs_rat=1.0, train_subset=None,
                 eval_subset=None, seed=None):
        """Loads Fashion-MNIST from data_dir (default system copy)."""
        self.data_dir = data_dir
        super().__init__(batch_size, batch_size_eval, lrn_rate_init, momentum, loss_w_dcy,
                         nb_epochs_rat, train_subset, eval_subset, seed)

    def _forward(self, inputs, is_training):
        return convnet.forward_convnet(inputs, is_training, self.nb_classes)

    @property
    def model_name(self):
        """'convnet'."""
        return 'convnet'
