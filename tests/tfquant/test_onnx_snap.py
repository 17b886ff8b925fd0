"""onnx_snap: an activation QuantizeLinear/DequantizeLinear pair given the trained graph's rounding gives, in
onnxruntime, the codes of the evaluation graph's quantizer (tfquant.ops.quantize_zero_exact, run by TensorFlow)
for every input, the rounding boundaries and their neighbouring floats included."""
import numpy as np
import pytest
import tensorflow as tf

from tfquant import ops
from tfquant.export import onnx_check, onnx_snap

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

tf1 = tf.compat.v1
# Trained-like ranges: asymmetric (zero point inside), a ReLU's (zero point 0), and one with a large zero point.
RANGES = [(-1.3172, 2.7061), (0.0, 6.1034), (-5.25, 0.4)]


def _eval_graph_quantizer(x, low, high):
    """(values, step, zero point) of the evaluation graph's 8-bit quantizer of range [low, high], run by TensorFlow."""
    graph = tf.Graph()
    with graph.as_default():
        data = tf1.placeholder(tf.float32, [None])
        low_t, high_t = tf.constant(low, tf.float32), tf.constant(high, tf.float32)
        values = ops.quantize_zero_exact(data, 8, low_t, high_t)
        step = ops.zero_exact_step(8, low_t, high_t)
        zero = tf.clip_by_value(tf.floor(-tf.minimum(low_t, 0.0) / step + 0.5), 0.0, 255.0)
        with tf1.Session(graph=graph) as sess:
            return sess.run([values, step, zero], {data: x})


def _pair_model(step, zero):
    """input x -> QuantizeLinear -> DequantizeLinear; outputs the codes q and the values y."""
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="quantize"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dequantize")]
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, [None]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
                              [numpy_helper.from_array(np.asarray(step, np.float32), "scale"),
                               numpy_helper.from_array(np.asarray(zero, np.uint8), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _inputs(step, low, rng):
    """Every rounding boundary (k + 1/2) * step + low of the grid in float32 and its four nearest floats on each
    side, random values across the range, and values beyond it."""
    boundaries = (np.arange(-2, 258, dtype=np.float32) + np.float32(0.5)) * step + low
    near = [boundaries]
    up = down = boundaries
    for _ in range(4):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        near += [up, down]
    spread = rng.uniform(float(low) - 3 * float(step), float(low) + 258 * float(step), 20000).astype(np.float32)
    return np.concatenate(near + [spread])


@pytest.mark.parametrize("low, high", RANGES)
def test_snapped_pair_gives_the_eval_graphs_codes(low, high):
    rng = np.random.default_rng(3)
    _, step, zero = _eval_graph_quantizer(np.zeros(1, np.float32), low, high)
    nudged_low = np.multiply(np.float32(-zero), step, dtype=np.float32)
    x = _inputs(step, nudged_low, rng)
    reference, _, _ = _eval_graph_quantizer(x, low, high)
    # The evaluation graph's values are code * step + low: their codes, read back exactly.
    expected = np.round((reference.astype(np.float64) - float(nudged_low)) / float(step)).astype(np.int64)
    plain = _pair_model(step, int(zero))
    snapped = _pair_model(step, int(zero))
    assert onnx_snap.snap_activations(snapped) == 1
    onnx.checker.check_model(snapped)
    codes = {}
    for label, model in (("plain", plain), ("snapped", snapped)):
        for optimize in (False, True):
            session = onnx_check.session(model.SerializeToString(), optimize=optimize)
            q, y = session.run(["q", "y"], {"x": x})
            codes[label, optimize] = q.astype(np.int64)
            if label == "snapped":
                np.testing.assert_array_equal(q, expected, err_msg="optimize=%s" % optimize)
                # The pair's own values: (code - zero point) * step, within an ulp of the evaluation graph's.
                np.testing.assert_allclose(y, reference, rtol=0, atol=float(np.spacing(np.float32(max(
                    abs(low), abs(high))))) * 2)
    # QuantizeLinear alone (round half to even of x / step) gives other codes at the boundaries: what the
    # snapping is for.
    assert np.any(codes["plain", False] != expected)
