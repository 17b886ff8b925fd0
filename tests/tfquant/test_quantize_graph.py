"""quantize_graph on conv, depthwise, dilated-conv and fully connected layers, against NumPy."""
import json

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tests.tfquant.reference import assert_matches_reference, quantize_np

# (name, weight shape, channel axes of the output channels)
LAYERS = {
    "conv": ([3, 3, 4, 6], (3,)),
    "depthwise": ([3, 3, 4, 2], (2, 3)),
    "dilated": ([3, 3, 4, 5], (3,)),
    "fc": ([20, 7], (1,)),
}


def _build(kind, rng):
    """A one-layer graph; returns (input placeholder, output, weight variable, consuming op, input value)."""
    shape, _ = LAYERS[kind]
    init = rng.normal(size=shape).astype(np.float32)
    weight = tf.compat.v1.get_variable("layer/weights", initializer=init)
    if kind == "fc":
        x = tf.compat.v1.placeholder(tf.float32, [2, 20])
        y = tf.matmul(x, weight)
        feed = rng.normal(size=(2, 20)).astype(np.float32)
    else:
        x = tf.compat.v1.placeholder(tf.float32, [2, 9, 9, 4])
        feed = rng.normal(size=(2, 9, 9, 4)).astype(np.float32)
        if kind == "depthwise":
            y = tf.nn.depthwise_conv2d(x, weight, [1, 1, 1, 1], "SAME")
        elif kind == "dilated":
            y = tf.nn.conv2d(x, weight, strides=1, padding="VALID", dilations=2)
        else:
            y = tf.nn.conv2d(x, weight, strides=2, padding="SAME")
    return x, y, weight, y.op, feed


def _reference_output(kind, x_value, weight_value):
    """The same layer computed in a fresh graph from NumPy weights."""
    g = tf.Graph()
    with g.as_default():
        w = tf.constant(weight_value)
        x = tf.constant(x_value)
        if kind == "fc":
            y = tf.matmul(x, w)
        elif kind == "depthwise":
            y = tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME")
        elif kind == "dilated":
            y = tf.nn.conv2d(x, w, strides=1, padding="VALID", dilations=2)
        else:
            y = tf.nn.conv2d(x, w, strides=2, padding="SAME")
        with new_session(g) as sess:
            return sess.run(y)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("buckets", ["none", "channel", "split"])
def test_rewritten_layer_matches_numpy(graph, rng, kind, bits, buckets):
    x, y, weight, op, feed = _build(kind, rng)
    shape, channel_axes = LAYERS[kind]
    bucket_size = 25  # divides none of the weight sizes (216, 72, 180, 140)
    config = tfquant.QuantConfig(weight_bits=bits, use_buckets=buckets != "none",
                                 bucket_type="split" if buckets == "split" else "channel",
                                 bucket_size=bucket_size, quantize_all_layers=True)
    report = tfquant.quantize_graph(graph, config)
    layer, = report.weight_layers
    assert layer.quantized and layer.bits == bits and layer.weight_variable == "layer/weights"
    with new_session(graph) as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        w_float, w_used, y_value = sess.run([weight, op.inputs[1], y], {x: feed})
    want_w = quantize_np(w_float, bits, buckets, channel_axes=channel_axes, bucket_size=bucket_size)
    assert_matches_reference(w_used, want_w, w_float, bits)
    np.testing.assert_allclose(y_value, _reference_output(kind, feed, w_used), rtol=1e-5, atol=1e-5)
    expected_groups = {"none": 1, "channel": int(np.prod([shape[a] for a in channel_axes])),
                       "split": -(-int(np.prod(shape)) // bucket_size)}[buckets]
    assert layer.num_groups == expected_groups
    assert np.unique(w_used).size <= expected_groups * 2 ** bits


def test_conv_attributes_and_name_survive(graph, rng):
    x = tf.compat.v1.placeholder(tf.float32, [1, 12, 12, 3])
    w = tf.compat.v1.get_variable("c/weights", initializer=rng.normal(size=(3, 3, 3, 4)).astype(np.float32))
    y = tf.nn.conv2d(x, w, strides=[1, 2, 2, 1], padding=[[0, 0], [1, 2], [2, 1], [0, 0]],
                     dilations=[1, 1, 1, 1], data_format="NHWC", name="my_conv")
    y2 = tf.nn.conv2d(y, tf.compat.v1.get_variable("d/weights", [3, 3, 4, 4]), strides=1, padding="VALID",
                      dilations=[1, 3, 3, 1], name="dilated_conv")
    before = {op.name: {k: op.node_def.attr[k].SerializeToString() for k in op.node_def.attr}
              for op in (y.op, y2.op)}
    tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=4, quantize_all_layers=True))
    for op in (y.op, y2.op):
        after = {k: op.node_def.attr[k].SerializeToString() for k in op.node_def.attr}
        assert after == before[op.name]
        assert graph.get_operation_by_name(op.name) is op
        assert "weight_quant" in op.inputs[1].name
    assert y.op.get_attr("dilations") == [1, 1, 1, 1] and y2.op.get_attr("dilations") == [1, 3, 3, 1]
    assert y.op.get_attr("explicit_paddings") == [0, 0, 1, 2, 2, 1, 0, 0]


def test_transposed_matmul_buckets_follow_output_channels(graph, rng):
    x = tf.compat.v1.placeholder(tf.float32, [2, 6])
    init = rng.normal(size=(5, 6)).astype(np.float32)
    w = tf.compat.v1.get_variable("fc/weights", initializer=init)
    y = tf.matmul(x, w, transpose_b=True)
    report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=2, use_buckets=True,
                                                               quantize_all_layers=True))
    assert report.weight_layers[0].num_groups == 5 and report.weight_layers[0].channel_axes == [0]
    with new_session(graph) as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        used = sess.run(y.op.inputs[1])
    np.testing.assert_allclose(used, quantize_np(init, 2, "channel", channel_axes=(0,)), atol=1e-6)


def test_batch_matmul_weight_is_quantized(graph, rng):
    x = tf.compat.v1.placeholder(tf.float32, [3, 2, 6])
    w = tf.compat.v1.get_variable("bmm/weights", initializer=rng.normal(size=(6, 4)).astype(np.float32))
    y = tf.linalg.matmul(x, w)  # rank-3 by rank-2: BatchMatMulV2
    assert y.op.type == "BatchMatMulV2"
    report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=3, use_buckets=True,
                                                               quantize_all_layers=True))
    layer, = report.weight_layers
    assert layer.quantized and layer.num_groups == 4


def test_straight_through_gradient_reaches_the_float_weights(graph, rng):
    x, y, weight, op, feed = _build("conv", rng)
    tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=2, quantize_all_layers=True))
    upstream = rng.normal(size=y.shape.as_list()).astype(np.float32)
    loss = tf.reduce_sum(y * upstream)
    grad_float, = tf.gradients(loss, [weight])
    grad_used, = tf.gradients(loss, [op.inputs[1]])
    with new_session(graph) as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        g_float, g_used = sess.run([grad_float, grad_used], {x: feed})
    # dQ/dw = 1: the float weight receives the gradient taken at the quantized weight.
    assert np.abs(g_used).max() > 0
    np.testing.assert_allclose(g_float, g_used, rtol=1e-4, atol=1e-5)
    assert weight in tf.compat.v1.trainable_variables()


def _three_layer_graph():
    x = tf.compat.v1.placeholder(tf.float32, [1, 8, 8, 16])
    h = tf.nn.conv2d(x, tf.compat.v1.get_variable("first/weights", [3, 3, 16, 16]), 1, "SAME")
    h = tf.nn.conv2d(h, tf.compat.v1.get_variable("mid/weights", [3, 3, 16, 32]), 1, "SAME")
    h = h + tf.compat.v1.get_variable("mid/biases", [32])
    h = tf.reduce_mean(h, [1, 2])
    tf.matmul(h, tf.compat.v1.get_variable("last/weights", [32, 10]))


@pytest.mark.parametrize("bucket_type,size,mid_bits", [
    # mid has 3*3*16*32 = 4608 weights at 4 bits, plus 64 bits per range group.
    ("channel", 256, 4608 * 4 + 32 * 64),
    ("split", 256, 4608 * 4 + 18 * 64),  # 4608 / 256 = 18 pieces exactly
    ("split", 1000, 4608 * 4 + 5 * 64),  # ceil(4.608) = 5 pieces
    (None, 256, 4608 * 4 + 64),
])
def test_storage_numbers_by_hand(graph, bucket_type, size, mid_bits):
    _three_layer_graph()
    report = tfquant.quantize_graph(graph, tfquant.QuantConfig(
        weight_bits=4, use_buckets=bucket_type is not None, bucket_type=bucket_type or "channel",
        bucket_size=size))
    first, mid, last = report.weight_layers
    assert not first.quantized and not last.quantized and mid.quantized
    assert first.storage_bits == 3 * 3 * 16 * 16 * 32 and last.storage_bits == 32 * 10 * 32
    assert mid.storage_bits == mid_bits
    assert report.weight_storage_bits == 2304 * 32 + 4608 * 4 + 320 * 32
    assert report.bucket_storage_bits == mid_bits - 4608 * 4
    assert report.other_storage_bits == 32 * 32  # the bias
    total = 2304 * 32 + mid_bits + 320 * 32 + 32 * 32
    assert report.total_storage_bits == total
    assert report.float_storage_bits == (2304 + 4608 + 320 + 32) * 32
    assert report.compression_ratio == pytest.approx((2304 + 4608 + 320 + 32) * 32 / total)


def test_first_and_last_follow_data_flow_not_creation_order(graph):
    x = tf.compat.v1.placeholder(tf.float32, [1, 8, 8, 3])
    h1 = tf.nn.relu(tf.nn.conv2d(x, tf.compat.v1.get_variable("a1/weights", [3, 3, 3, 8]), 1, "SAME"))
    h2 = tf.nn.relu(tf.nn.conv2d(h1, tf.compat.v1.get_variable("a2/weights", [3, 3, 8, 8]), 1, "SAME"))
    logits = tf.matmul(tf.reduce_mean(h2, [1, 2]), tf.compat.v1.get_variable("fc/weights", [8, 10]))
    # An auxiliary head built after the classifier but shallower in the data flow.
    aux = tf.nn.conv2d(h1, tf.compat.v1.get_variable("aux/weights", [1, 1, 8, 2]), 1, "SAME")
    del logits, aux
    report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=4))
    status = {layer.weight_variable: layer.reason for layer in report.weight_layers}
    assert status["a1/weights"].startswith("first layer kept float")
    assert status["fc/weights"].startswith("last layer kept float")
    assert sorted(layer.weight_variable for layer in report.weight_layers if layer.quantized) == \
        ["a2/weights", "aux/weights"]


def _chain(widths=(3, 8, 8, 8)):
    x = tf.compat.v1.placeholder(tf.float32, [2, 6, 6, widths[0]])
    h = x
    for i in range(len(widths) - 1):
        w = tf.compat.v1.get_variable("block%d/conv/weights" % i, [3, 3, widths[i], widths[i + 1]])
        h = tf.nn.relu(tf.nn.conv2d(h, w, 1, "SAME"), name="block%d/relu" % i)
    logits = tf.matmul(tf.reduce_mean(h, [1, 2]), tf.compat.v1.get_variable("fc/weights", [widths[-1], 10]))
    return x, logits


def test_overrides_first_match_wins_and_full_match(graph):
    _chain()
    config = tfquant.QuantConfig(
        weight_bits=4, activation_bits=8,
        weight_overrides=[("block1/.*", 2), ("block.*", 6), ("conv", 3), ("fc/weights", 8)],
        activation_overrides={"block0/relu": 32, "block2/.*": 5})
    report = tfquant.quantize_graph(graph, config)
    bits = {layer.weight_variable or layer.name: layer.bits for layer in report.layers}
    assert bits["block0/conv/weights"] == 6  # an override beats the first-layer rule
    assert bits["block1/conv/weights"] == 2  # first match wins over 'block.*'
    assert bits["block2/conv/weights"] == 6
    assert bits["fc/weights"] == 8
    assert bits["block0/relu"] == 32 and bits["block1/relu"] == 8 and bits["block2/relu"] == 5
    assert "weight override 'conv' matched no layer" in report.notes  # 'conv' must match in full


def test_explicit_layer_bits_and_length_check(graph):
    _chain()
    report = tfquant.quantize_graph(graph, tfquant.QuantConfig(layer_bits=[8, 3, 2, 32]))
    assert [layer.bits for layer in report.weight_layers] == [8, 3, 2, 32]
    assert [layer.quantized for layer in report.weight_layers] == [True, True, True, False]
    g = tf.Graph()
    with g.as_default():
        _chain()
        with pytest.raises(ValueError, match="layer_bits has 2 entries but the graph has 4 matmul-like layers"):
            tfquant.quantize_graph(g, tfquant.QuantConfig(layer_bits=[8, 4]))


def test_rewriting_twice_is_refused(graph):
    _chain()
    tfquant.quantize_graph(graph, tfquant.QuantConfig())
    count = len(graph.get_operations())
    with pytest.raises(RuntimeError, match="already rewritten"):
        tfquant.quantize_graph(graph, tfquant.QuantConfig())
    assert len(graph.get_operations()) == count


def test_gradient_and_summary_ops_are_never_touched(graph):
    x, logits = _chain()
    relu = graph.get_operation_by_name("block1/relu").outputs[0]
    summary = tf.compat.v1.summary.histogram("relu_hist", relu)
    grads = tf.gradients(tf.reduce_sum(logits), tf.compat.v1.trainable_variables())
    relu_grads = [op for op in graph.get_operations() if op.type == "ReluGrad"]
    grad_inputs = {op.name: [t.name for t in op.inputs] for op in relu_grads}
    tfquant.quantize_graph(graph, tfquant.QuantConfig(activation_bits=4))
    assert summary.op.inputs[1] is relu
    assert {op.name: [t.name for t in op.inputs] for op in relu_grads} == grad_inputs
    # ...while the forward consumer now reads the quantized activation.
    consumer = [op for op in relu.consumers() if op.type == "Conv2D"]
    assert consumer == []
    assert grads


def test_skipped_ops_are_reported_with_reasons(graph):
    x = tf.compat.v1.placeholder(tf.float32, [1, 4, 4, 4, 2])
    tf.nn.conv3d(x, tf.compat.v1.get_variable("vol/weights", [2, 2, 2, 2, 3]), [1] * 5, "SAME")
    img = tf.compat.v1.placeholder(tf.float32, [1, 6, 6, 2])
    kernel = tf.compat.v1.placeholder(tf.float32, [3, 3, 2, 2])
    tf.nn.conv2d(img, kernel, 1, "SAME", name="fed_conv")
    report = tfquant.quantize_graph(graph, tfquant.QuantConfig(quantize_all_layers=True))
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["fed_conv"] == "weight not from a trainable variable"
    conv3d = [layer for layer in report.layers if layer.op_type == "Conv3D"][0]
    assert conv3d.reason == "unsupported op type Conv3D" and conv3d.storage_bits == 48 * 32
    assert not report.quantized_layers


def test_graph_without_candidates_says_so(graph):
    tf.reduce_sum(tf.compat.v1.placeholder(tf.float32, [3]))
    report = tfquant.quantize_graph(graph, tfquant.QuantConfig())
    assert report.layers == [] and report.notes == ["no quantizable op found: nothing was quantized"]


def test_report_json_and_table(graph):
    _chain()
    report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=3, activation_bits=8,
                                                               use_buckets=True, bucket_type="split",
                                                               bucket_size=64))
    data = json.loads(report.to_json())
    assert data["config"]["weight_bits"] == 3 and data["config"]["bucket_type"] == "split"
    by_var = {layer["weight_variable"]: layer for layer in data["layers"] if layer["kind"] == "weight"}
    mid = by_var["block1/conv/weights"]
    assert mid["status"] == "quantized" and mid["shape"] == [3, 3, 8, 8] and mid["num_groups"] == 9
    assert mid["weight_storage_bits"] == 576 * 3 and mid["bucket_storage_bits"] == 9 * 64
    assert by_var["block0/conv/weights"]["status"] == "skipped"
    assert data["summary"]["total_storage_bits"] == report.total_storage_bits
    ranges = [layer["range_variables"] for layer in data["layers"] if layer["kind"] == "activation"]
    assert ranges[0] == ["block0/relu/act_quant/ema_min", "block0/relu/act_quant/ema_max"]
    again = tfquant.QuantReport.from_json(report.to_json())
    assert again.to_dict() == report.to_dict()
    table = report.format_table()
    assert "block1/conv/weights" in table and "split/64" in table
    assert "first layer kept float" in table and "compression" in table
