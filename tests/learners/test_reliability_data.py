"""No wrong result from bad numbers: data checked finite in the model's dtype, non-finite logits never scored,
and TensorFlow's errors reduced to their cause."""
import errno
import os

import numpy as np
import pytest
import tensorflow as tf

from learners import full_precision, graphs
from learners.errors import UserError
from nets.data import npz, pipeline
from nets.errors import DataError
from nets.model_helper import ClassifierModelHelper
from tfquant import files
from tfquant.export import run_directory

tf1 = tf.compat.v1


def _archive(path, **overrides):
    arrays = dict(x_train=np.zeros((6, 4, 4, 1)), y_train=np.zeros(6, np.int64), x_test=np.zeros((5, 4, 4, 1)),
                  y_test=np.zeros(5, np.int64))
    arrays.update(overrides)
    np.savez(str(path), **arrays)
    return str(path)


@pytest.mark.parametrize("name", ["x_train", "x_test"])
def test_float64_values_beyond_float32_are_refused_naming_them(tmp_path, name):
    images = np.random.default_rng(0).normal(size=(6 if name == "x_train" else 5, 4, 4, 1))
    images[3, 2, 1, 0] = 1e300
    images[4, 0, 0, 0] = -4e38  # finite in float64, -inf in float32
    path = _archive(tmp_path / "d.npz", **{name: images})
    assert np.all(np.isfinite(images))  # the check before the cast let these through
    with pytest.raises(DataError) as caught:
        npz.load_npz(path)
    assert str(caught.value) == (
        "data archive %s: %s holds 2 values that overflow float32, the dtype the model reads (e.g. 1e+300 at index "
        "[3, 2, 1, 0] of float64); expected values within +-3.403e+38" % (path, name))


def test_nan_and_largest_float32_values(tmp_path):
    images = np.zeros((5, 4, 4, 1))
    images[1, 1, 1, 0] = np.nan
    path = _archive(tmp_path / "nan.npz", x_test=images)
    with pytest.raises(DataError, match=r"x_test holds 1 NaN or infinite values; expected finite images$"):
        npz.load_npz(path)
    # The largest float32 itself is fine, as float64 and as float32.
    edge = np.full((5, 4, 4, 1), np.finfo(np.float32).max, np.float64)
    data = npz.load_npz(_archive(tmp_path / "edge.npz", x_test=edge))
    assert data.n_eval == 5


def test_export_test_images_are_checked_after_the_cast():
    images = np.zeros((3, 2, 2, 1))
    images[0, 0, 0, 0] = 1e39
    with pytest.raises(run_directory.ExportError, match=r"^test images=array of dtype float64 is not valid: 1 values "
                                                        r"are NaN or infinite as float32 \(1 of them overflow it\)"):
        run_directory._check_data((images, np.zeros(3, np.int64)), None, [None, 2, 2, 1])


class _Linear(ClassifierModelHelper):
    """logits = flattened images @ ones: finite data whose logits overflow where the pixels are large."""

    base_epochs = 1
    train_preprocess = staticmethod(lambda images, labels, stateless_seed=None: (images, labels))
    eval_preprocess = staticmethod(lambda images, labels: (images, labels))
    model_name, dataset_name = "linear", "toy"

    def __init__(self, test_images):
        self._test = test_images
        super().__init__(4, 4, 0.1, 0.9, 0.0, 1.0, None, None, 0)

    def _load_data(self):
        return pipeline.ArrayData(np.zeros((8, 2, 2, 1), np.float32), np.zeros(8, np.int64), self._test,
                                  np.arange(len(self._test)) % 3)

    def _forward(self, inputs, is_training):
        weights = tf1.get_variable("weights", initializer=tf.ones([4, 3]))
        return tf.matmul(tf.reshape(inputs, [-1, 4]), weights)


def _checkpoint(helper, tmp_path):
    model = graphs.build_graph(helper, False)
    with model.graph.as_default():
        saver = tf1.train.Saver(model.model_variables)
    with tf1.Session(graph=model.graph) as sess:
        sess.run(model.init_op)
        return saver.save(sess, str(tmp_path / "model.ckpt"), global_step=1, write_meta_graph=False)


def test_non_finite_logits_are_an_error_never_an_accuracy(tmp_path):
    images = np.ones((10, 2, 2, 1), np.float32)
    images[[2, 5, 9], :2, 0, 0] = 3e38  # finite float32 pixels whose sum overflows
    helper = _Linear(images)
    checkpoint = _checkpoint(helper, tmp_path)
    with pytest.raises(graphs.NonFiniteLogits) as caught:
        full_precision.evaluate_checkpoint(helper, checkpoint, str(tmp_path / "logs"))
    assert str(caught.value) == ("checkpoint %s gives NaN or infinite logits for 3 of 10 test images, so no accuracy "
                                 "is reported; expected finite outputs (check the test data and the checkpoint)"
                                 % checkpoint)
    # The same model on finite logits scores as NumPy does: every logit ties, argmax is class 0.
    finite = _Linear(np.ones((10, 2, 2, 1), np.float32))
    accuracy, _, count = full_precision.evaluate_checkpoint(finite, checkpoint, str(tmp_path / "logs"))
    assert count == 10 and accuracy == pytest.approx(np.mean(np.arange(10) % 3 == 0))


def test_export_refuses_to_score_non_finite_logits():
    logits = np.array([[1.0, 2.0], [np.nan, 0.0], [np.inf, 1.0]])
    with pytest.raises(run_directory.ExportError, match=r"^the frozen graph gives NaN or infinite logits for 2 of 3 "
                                                        r"test images, so no accuracy is reported"):
        run_directory.accuracy(logits, np.array([1, 0, 0]), "the frozen graph")


# -- TensorFlow's errors reduced to their cause -------------------------------------------------------------

SAVE_ERROR = """Graph execution error:

Detected at node 'save/SaveV2' defined at (most recent call last):
    File "/home/user/train.py", line 6, in <module>
    File "/home/user/.venv/lib/python3.11/site-packages/tensorflow/python/training/saver.py", line 934, in __init__
Node: 'save/SaveV2'
/data/run/models/model.ckpt-1400.data-00000-of-00001.tempstate11064488951254027554; No space left on device
\t [[{{node save/SaveV2}}]]
Hint: If you want to see a list of allocated tensors when OOM happens, add report_tensor_allocations_upon_oom to \
RunOptions for current allocation info. This isn't available when running in Eager mode."""


def test_tensorflow_error_is_reduced_to_cause_op_and_file():
    error = tf.errors.ResourceExhaustedError(None, None, SAVE_ERROR)
    assert files.error_cause(error) == ("No space left on device", "save/SaveV2",
                                        "/data/run/models/model.ckpt-1400.data-00000-of-00001")
    assert files.describe_error(error) == ("No space left on device (op save/SaveV2, file "
                                           "/data/run/models/model.ckpt-1400.data-00000-of-00001)")
    assert files.describe_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/x/y")) == (
        "Read-only file system (file /x/y)")
    assert files.describe_error(tf.errors.NotFoundError(None, None, "Unsuccessful TensorSliceReader constructor")) \
        == "Unsuccessful TensorSliceReader constructor"


def test_failed_save_names_the_cause_however_long_the_stack(tmp_path):
    from tests.learners.test_system_errors import _toy
    with pytest.raises(UserError) as caught:
        _toy(tmp_path, save_step=3, fail_at=6, error=tf.errors.ResourceExhaustedError(None, None, SAVE_ERROR))
    prefix = tmp_path / "ckpt" / "model.ckpt"
    assert str(caught.value) == (
        "checkpoint %s-6 cannot be saved (No space left on device (op save/SaveV2, file /data/run/models/"
        "model.ckpt-1400.data-00000-of-00001)); expected a writable directory with free space; the last good "
        "checkpoint %s-3 is kept" % (prefix, prefix))
