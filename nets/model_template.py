"""Template: your own network as a ModelHelper, trained and quantized by every learner.

Copy this file, then change three things: _load_data (your data as a pipeline.ArrayData of NumPy arrays),
_forward (your network, built from tf.compat.v1 ops; name the variables that should get weight decay
'...weights'), and the preprocessing functions (whole batches: images, labels -> float32 images, labels).
Run it like the built-in models:
  ./run_local.sh nets/model_template.py --learner=uniform --uql_weight_bits=4 --uql_activation_bits=8
  ./run_local.sh nets/model_template.py --learner=ptq --uql_calibrator=mse
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from learners import runner  # noqa: E402  (first: it imports TensorFlow without start-up chatter)
from learners.helper_factory import helper_kwargs  # noqa: E402

import tensorflow as tf  # noqa: E402

from nets import layers  # noqa: E402
from nets.data import fmnist, pipeline  # noqa: E402
from nets.model_helper import ClassifierModelHelper  # noqa: E402


class ModelHelper(ClassifierModelHelper):
    """A small batch-norm CNN on Fashion-MNIST: the pieces a helper of your own needs."""

    nb_classes = 10
    base_epochs = 1  # --nb_epochs_rat scales this budget
    train_preprocess = staticmethod(pipeline.fmnist_train_preprocess)
    eval_preprocess = staticmethod(pipeline.fmnist_eval_preprocess)

    def __init__(self, data_dir=None, batch_size=128, batch_size_eval=500, lrn_rate_init=0.05, momentum=0.9,
                 loss_w_dcy=1e-4, nb_epochs_rat=1.0, train_subset=None, eval_subset=None, seed=None):
        """Keyword names are the flags' (learners.helper_factory.helper_kwargs passes them)."""
        self.data_dir = data_dir
        super().__init__(batch_size, batch_size_eval, lrn_rate_init, momentum, loss_w_dcy, nb_epochs_rat,
                         train_subset, eval_subset, seed)

    def _load_data(self):
        # Any uint8 or float images [N,H,W,C] with integer labels: pipeline.ArrayData(x_train, y_train, x_test, y_test).
        return pipeline.ArrayData(**fmnist.load_fmnist(self.data_dir))

    def _forward(self, inputs, is_training):
        # Called inside the 'model' variable scope for the training graph and again for the evaluation graph:
        # the same variable names in both let checkpoints move between them.
        x = tf.nn.relu(layers.batch_norm(layers.conv2d(inputs, 16, 3, 1, "conv1"), is_training, "bn1"))
        x = layers.max_pool(x)
        x = tf.nn.relu(layers.batch_norm(layers.conv2d(x, 32, 3, 1, "conv2"), is_training, "bn2"))
        x = layers.global_avg_pool(x)
        return layers.dense(x, self.nb_classes, "fc")

    @property
    def model_name(self):
        return "template_cnn"

    @property
    def dataset_name(self):
        return "fmnist"


def make_helper(settings):
    """The helper from the parsed flags."""
    return ModelHelper(**helper_kwargs(settings, False))


if __name__ == "__main__":
    runner.run(make_helper)
