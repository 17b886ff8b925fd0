"""Model helper: MobileNet v1/v2 (the builder of nets/mobilenet.py) on Fashion-MNIST (28x28x1).

Fashion-MNIST's 28x28 images go in at their size with the builder's 'small' stem (the first convolution and the
first stride-2 stage at stride 1, total stride 8): the last feature map is 4x4, where the ILSVRC-12 stem's stride
32 would leave 1x1 (and upsampling to 32 would cost 1.3x the compute for no information).
"""

from nets import mobilenet
from nets.model_helper import FashionMnistData, ClassifierModelHelper


class ModelHelper(FashionMnistData, ClassifierModelHelper):
    """MobileNet (v2 by default) on Fashion-MNIST: cosine schedule, rate 0.1 at batch 128, decay 4e-5 (slim's,
    depthwise filters undecayed), 10 epochs."""

    base_epochs = 10
    lrn_rate_schedule = 'cosine'

    def __init__(self, data_dir=None, mobilenet_version=2, mobilenet_depth_mult=1.0, batch_size=128,
                 batch_size_eval=500, lrn_rate_init=0.1, momentum=0.9, loss_w_dcy=4e-5, nb_epochs_rat=1.0,
                 train_subset=None, eval_subset=None, seed=None):
        """Validates the version (1, 2) and depth multiplier (> 0), then loads Fashion-MNIST from data_dir."""
        if mobilenet_version not in mobilenet.ALLOWED_VERSIONS:
            raise ValueError('mobilenet_version %r is not supported; allowed values: 1, 2' % (mobilenet_version,))
        if not mobilenet_depth_mult > 0:
            raise ValueError('mobilenet_depth_mult %r is not valid; expected a positive number'
                             % (mobilenet_depth_mult,))
        self.data_dir = data_dir
        self.mobilenet_version = int(mobilenet_version)
        self.mobilenet_depth_mult = float(mobilenet_depth_mult)
        super().__init__(batch_size, batch_size_eval, lrn_rate_init, momentum, loss_w_dcy, nb_epochs_rat,
                         train_subset, eval_subset, seed)

    def _forward(self, inputs, is_training):
        return mobilenet.forward_mobilenet(inputs, is_training, self.mobilenet_version, self.mobilenet_depth_mult,
                                          self.nb_classes, stem='small')

    @property
    def model_name(self):
        """'mobilenet_v<version>', with '_x<multiplier>' unless the multiplier is 1."""
        name = 'mobilenet_v%d' % self.mobilenet_version
        return name if self.mobilenet_depth_mult == 1.0 else '%s_x%g' % (name, self.mobilenet_depth_mult)
