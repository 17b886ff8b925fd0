"""--learner ptq --uql_adaround: the saved weights carry AdaRound's codes (within one step of nearest rounding, on
the nearest-rounding grid), lower the first layer's output error on the calibration batches than nearest rounding
(measured with tf.nn.conv2d on the images themselves), and pack and reload bit for bit."""
import json

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from learners import adaround_runner, flags as learner_flags
from learners.errors import UserError
from learners.ptq import PTQLearner
from nets import model_template
from tests.learners.test_ptq import settings_in
from tfquant.export import model_export

tf1 = tf.compat.v1
BITS = 3
LAYERS = ("model/conv1/weights", "model/conv2/weights", "model/fc/weights")


@pytest.fixture(scope="module")
def adaround_run(tmp_path_factory):
    helper = model_template.ModelHelper(batch_size=32, batch_size_eval=100, train_subset=256, eval_subset=100,
                                        nb_epochs_rat=0.25, seed=0)
    directory = str(tmp_path_factory.mktemp("adaround"))
    settings = settings_in(directory, uql_adaround=True, uql_adaround_iters=150, uql_adaround_batches=2)
    config = tfquant.QuantConfig(weight_bits=BITS, activation_bits=8, use_buckets=True, bucket_type="channel",
                                 quantize_all_layers=True)
    learner = PTQLearner(helper, settings, config)
    return helper, learner, learner.train(), directory


def channel_grid(w):
    """NumPy min/max grid per output channel (the last axis): (nearest codes, step, offset)."""
    axes = tuple(range(w.ndim - 1))
    low, high = w.min(axis=axes), w.max(axis=axes)
    step = (high - low) / (2 ** BITS - 1)
    return np.round((w - low) / step).astype(np.int64), step, low


def test_saved_weights_are_adaround_codes_on_the_nearest_grid(adaround_run):
    _, _, results, _ = adaround_run
    floats = tf.train.load_checkpoint(results["float_checkpoint"])
    saved = tf.train.load_checkpoint(results["quant_checkpoint"])
    changed = 0
    for name in LAYERS:
        w0, w1 = floats.get_tensor(name), saved.get_tensor(name)
        nearest, step, low = channel_grid(w0)
        codes, step1, low1 = channel_grid(w1)
        np.testing.assert_array_equal(low1, low)  # the grid is the same: only the rounding changed
        np.testing.assert_allclose(step1, step, rtol=1e-6)
        assert np.abs(codes - nearest).max() == 1
        changed += int(np.sum(codes != nearest))
    assert changed > 0
    per_layer = {layer["weight_variable"]: layer for layer in results["adaround"]["layers"]}
    assert sorted(per_layer) == sorted(LAYERS)
    for layer in per_layer.values():
        assert layer["adaround_output_error"] < layer["nearest_output_error"]
    assert results["adaround"]["seconds"] > 0
    on_disk = json.load(open(results["report"].replace("quant_report.json", "results.json")))
    assert on_disk["adaround"]["layers"][0]["changed_share"] == results["adaround"]["layers"][0]["changed_share"]


def test_first_layer_output_error_is_lower_on_the_calibration_batches(adaround_run):
    helper, _, results, _ = adaround_run
    w0 = tf.train.load_checkpoint(results["float_checkpoint"]).get_tensor("model/conv1/weights")
    w1 = tf.train.load_checkpoint(results["quant_checkpoint"]).get_tensor("model/conv1/weights")
    with tf.Graph().as_default():
        images, _ = helper.build_dataset_train()
        with tf1.Session() as sess:
            batch = np.concatenate([sess.run(images) for _ in range(2)])
            errors = []
            for w in (w0, w1):
                codes, step, low = channel_grid(w)
                quantized = (codes * step + low).astype(np.float32)
                diff = tf.nn.conv2d(batch, w0 - quantized, [1, 1, 1, 1], "SAME")
                errors.append(sess.run(tf.reduce_mean(tf.reduce_sum(tf.square(diff), axis=-1))))
    nearest_error, adaround_error = errors
    assert adaround_error < 0.95 * nearest_error


def test_packed_model_reloads_the_adaround_codes_bit_for_bit(adaround_run, tmp_path):
    _, learner, results, _ = adaround_run
    packed = str(tmp_path / "model.tfq")
    model_export.pack_checkpoint(results["quant_checkpoint"], results["report"], packed)
    weights, _ = model_export.load_packed_weights(packed)
    saved = tf.train.load_checkpoint(results["quant_checkpoint"])
    with tf.Graph().as_default():
        fetches = {name: tfquant.quantize_weight(tf.constant(saved.get_tensor(name)), BITS,
                                                 tfquant.GroupLayout("channel", channel_axes=(-1,)))
                   for name in LAYERS}
        with tf1.Session() as sess:
            trained = sess.run(fetches)
    for name in LAYERS:
        np.testing.assert_array_equal(weights[name], trained[name])  # the quantizer's values, bit for bit
        # And NumPy's float32 decoding of the codes (alpha = max - min + 1e-10, step = alpha * float32(1/(2^k-1))).
        w = saved.get_tensor(name)
        codes, _, _ = channel_grid(w)
        low, high = w.min(axis=tuple(range(w.ndim - 1))), w.max(axis=tuple(range(w.ndim - 1)))
        step = ((high - low) + np.float32(1e-10)) * np.float32(1.0 / (2 ** BITS - 1))
        np.testing.assert_array_equal(weights[name], codes.astype(np.float32) * step + low)
    accuracy, _, _ = learner.evaluate()
    assert accuracy == pytest.approx(results["quant_accuracy"], abs=1e-6)


def test_adaround_flags_are_checked(monkeypatch):
    learner_flags.define_flags()
    flags = learner_flags.FLAGS
    flags(["prog"])
    for argv, message in (
            (["--learner=uniform", "--uql_adaround"], "--uql_adaround is not valid with --learner=uniform"),
            (["--learner=ptq", "--uql_adaround", "--uql_weight_range=lsq"], "expected minmax"),
            (["--learner=ptq", "--uql_adaround", "--uql_fold_batch_norms"], "--uql_fold_batch_norms"),
            (["--learner=ptq", "--uql_adaround", "--uql_adaround_iters=0"], "--uql_adaround_iters=0"),
            (["--learner=ptq", "--uql_adaround_batches=3"], "has no effect without --uql_adaround"),
            (["--learner=ptq", "--uql_bn_reestimate_batches=3"], "expected --learner=uniform"),
            (["--learner=uniform", "--uql_bn_reestimate_batches=-1"], "expected 0 (off)")):
        flags.unparse_flags()
        flags(["prog"] + argv)
        try:
            with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
                learner_flags.validate_flags()
        finally:
            flags.unparse_flags()
    flags(["prog"])


def test_layer_inputs_computed_from_earlier_ones_equal_those_from_the_images(rng):
    """The feed plan computes each layer's input from the nearest earlier layer inputs (fetched before the later
    weights changed); the values equal those computed from the images with every weight as it is now."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [2, 6, 6, 3])
        w1, w2, w3 = (tf1.Variable(rng.normal(size=shape).astype(np.float32))
                      for shape in ((3, 3, 3, 4), (3, 3, 4, 4), (1, 1, 4, 4)))
        first = tf.nn.relu(tf.nn.conv2d(images, w1, [1, 1, 1, 1], "SAME"))
        second = tf.nn.relu(tf.nn.conv2d(first, w2, [1, 1, 1, 1], "SAME") + first)  # a residual block
        third = tf.nn.conv2d(second, w3, [1, 1, 1, 1], "SAME")
        inputs = [images, first, first, second, third]  # layers w1, w2, a second reader of `first`, w3, then one more
        plans, last_use = adaround_runner._feed_plan(inputs, images)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            batch = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
            cached = {}
            for index, (tensor, weight) in enumerate(zip(inputs, (w1, w2, None, w3, None))):
                feeds = {graph.get_tensor_by_name(name): cached[name] for name in plans[index]}
                value = sess.run(tensor, feed_dict={images: batch, **feeds})
                np.testing.assert_array_equal(value, sess.run(tensor, feed_dict={images: batch}))
                cached[tensor.name] = value
                if weight is not None:  # the layer is rounded: its weight changes before the next input
                    sess.run(weight.assign(weight * 0.5 + 0.1))
    assert plans == [[], [], [first.name], [first.name], [second.name]]
    assert last_use == [-1, 3, -1, 4, -1]
