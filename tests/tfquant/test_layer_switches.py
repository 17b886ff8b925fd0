"""Layer switches on every kind of quantizer: all on is the quantized graph, all off the float one, exactly.

For each grid (min/max, symmetric, LSQ weights; EMA, PACT, LSQ activations; batch-norm folding; every int8
tensor quantized; split buckets) a small residual CNN is built three times from the same initial values: plain
float, quantized, and quantized with switches. The switched graph must reproduce the quantized graph with every
switch on and the float graph with every switch off.
"""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from nets import layers
from tfquant import layer_switches

tf1 = tf.compat.v1


def _forward(images):
    with tf1.variable_scope("model"):
        x = tf.nn.relu(layers.batch_norm(layers.conv2d(images, 8, 3, 1, "conv1"), False, "bn1"))
        y = layers.batch_norm(layers.conv2d(x, 8, 3, 1, "conv2"), False, "bn2")
        x = tf.nn.relu(x + y)
        return layers.dense(layers.global_avg_pool(x), 5, "fc")


def _logits(config, switched, data, on=True):
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(1)
        images = tf1.placeholder(tf.float32, [None, 8, 8, 3])
        logits = _forward(images)
        feed = {images: data}
        if config is not None:
            report = tfquant.quantize_graph(graph, config, is_training=False)
            logits = report.output(logits)
            if switched:
                switches, (logits,) = layer_switches.insert_switches(graph, report, [logits])
                quantized = [layer.name for layer in report.layers if layer.quantized]
                assert sorted(layer_switches.layer_names(switches)) == sorted(quantized)
                feed.update(layer_switches.switch_feed(switches, quantized if on else []))
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            # Moving statistics other than 0/1, so folding changes the weights.
            for variable in tf1.global_variables():
                if variable.op.name.endswith("moving_variance"):
                    sess.run(variable.assign(tf.fill(variable.shape, 2.0)))
            return sess.run(logits, feed)


CONFIGS = {
    "minmax": dict(weight_bits=3, activation_bits=4),
    "symmetric_channel": dict(weight_bits=4, activation_bits=8, weight_scheme="symmetric", use_buckets=True,
                              bucket_type="channel"),
    "split": dict(weight_bits=2, activation_bits=32, use_buckets=True, bucket_type="split", bucket_size=16),
    "lsq": dict(weight_bits=3, activation_bits=3, weight_range="lsq", act_range="lsq"),
    "pact": dict(weight_bits=4, activation_bits=2, act_range="pact"),
    "folded_int8": dict(weight_bits=8, activation_bits=8, weight_scheme="symmetric", fold_batch_norms=True,
                        quantize_layer_outputs=True, quantize_all_layers=True),
}


DATA = np.random.RandomState(0).rand(6, 8, 8, 3).astype(np.float32)


@pytest.fixture(scope="module")
def float_logits():
    return _logits(None, False, DATA)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_all_on_is_quantized_and_all_off_is_float(name, float_logits):
    config = tfquant.QuantConfig(**CONFIGS[name])
    data = DATA
    quantized = _logits(config, False, data)
    assert np.abs(quantized - float_logits).max() > 1e-4  # the quantization changes something
    np.testing.assert_array_equal(_logits(config, True, data, on=True), quantized)
    np.testing.assert_allclose(_logits(config, True, data, on=False), float_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["minmax", "lsq", "pact", "split"])
def test_a_switched_off_quantizer_does_not_run(name):
    """Off, a layer's Q(x) is never computed (fetching it fails) and its readers get x; on, Q(x) is there."""
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(1)
        images = tf1.placeholder(tf.float32, [None, 8, 8, 3])
        logits = _forward(images)
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(**CONFIGS[name]), is_training=False)
        switches, (logits,) = layer_switches.insert_switches(graph, report, [report.output(logits)])
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            for record in switches:
                others = [r.name for r in switches if r.switch is not record.switch]
                feed = {images: DATA, **layer_switches.switch_feed(switches, others)}
                x, output, _ = sess.run([record.float_tensor, record.output, logits], feed)
                np.testing.assert_array_equal(output, x)
                with pytest.raises(tf.errors.InvalidArgumentError, match="does not have value"):
                    sess.run(record.quantized_tensor, feed)
                feed = {images: DATA, **layer_switches.switch_feed(switches, [record.name])}
                q, output = sess.run([record.quantized_tensor, record.output], feed)
                np.testing.assert_array_equal(output, q)
