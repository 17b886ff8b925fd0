"""Model helper: a small Transformer encoder on Fashion-MNIST (patches or rows as tokens)."""

from nets import transformer
from nets.model_helper import FashionMnistData, ClassifierModelHelper


class ModelHelper(FashionMnistData, ClassifierModelHelper):
    """Transformer encoder (width 64, 2 blocks, 4 heads, MLP 128) with a cosine schedule and warm-up.

    Budget and rate measured on this machine (seed 0): 20 epochs at 0.1 reach 88.43 % float; 10 epochs at 0.05
    stopped at 86.71 %.
    """

    base_epochs = 20
    lrn_rate_schedule = 'cosine'
    warmup_ratio = 0.05

    def __init__(self, data_dir=None, transformer_tokens='patches', batch_size=128, batch_size_eval=500,
                 lrn_rate_init=0.1, momentum=0.9, loss_w_dcy=1e-4, nb_epochs_rat=1.0, train_subset=None,
                 eval_subset=None, seed=None):
        """Loads Fashion-MNIST from data_dir (default system copy); transformer_tokens: 'patches' or 'rows'."""
        if transformer_tokens not in ('patches', 'rows'):
            raise ValueError("transformer_tokens %r is not supported; allowed: patches, rows" % (transformer_tokens,))
        self.data_dir = data_dir
        self.tokens = transformer_tokens
        super().__init__(batch_size, batch_size_eval, lrn_rate_init, momentum, loss_w_dcy, nb_epochs_rat,
                         train_subset, eval_subset, seed)

    def _forward(self, inputs, is_training):
        # No batch norm or dropout: training and inference build the same network.
        del is_training
        return transformer.forward_transformer(inputs, self.nb_classes, self.tokens, **transformer.DEFAULTS)

    @property
    def model_name(self):
        """'transformer_patches' or 'transformer_rows'."""
        return 'transformer_%s' % self.tokens
