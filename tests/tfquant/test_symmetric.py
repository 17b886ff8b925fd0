"""The symmetric weight grid (zero point 0, +-(2^(k-1)-1)) against NumPy, in graphs and packed files."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tfquant import ops, step_ops

tf1 = tf.compat.v1


def _symmetric_np(x, bits, channel_axis=None):
    """Reference: per group step = max|x| / (2^(k-1)-1), q = round(x / step) clipped to +-(2^(k-1)-1)."""
    x = np.asarray(x, np.float64)
    level = 2 ** (bits - 1) - 1
    if channel_axis is None:
        amax = np.abs(x).max()
    else:
        axes = tuple(a for a in range(x.ndim) if a != channel_axis)
        amax = np.abs(x).max(axis=axes, keepdims=True)
    step = amax / level
    q = np.clip(np.round(x / step), -level, level)
    return q, step


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_symmetric_grid_matches_numpy(graph, rng, bits, per_channel):
    x = rng.normal(size=(3, 3, 4, 6)).astype(np.float32) * rng.uniform(0.1, 3, size=6).astype(np.float32)
    layout = ops.GroupLayout("channel", channel_axes=(3,)) if per_channel else ops.GroupLayout()
    tensor = tf.constant(x)
    quantized = step_ops.quantize_weight_symmetric(tensor, bits, layout)
    codes, alpha, beta = step_ops.symmetric_weight_codes(tensor, bits, layout)
    with new_session(graph) as sess:
        got, got_codes, got_alpha, got_beta = sess.run([quantized, codes, alpha, beta])
    q, step = _symmetric_np(x, bits, 3 if per_channel else None)
    level = 2 ** (bits - 1) - 1
    signed = got_codes - level
    # Zero point 0: the signed code is round(x / step) on the narrow grid, both ends reached.
    assert signed.min() >= -level and signed.max() <= level
    np.testing.assert_array_equal(signed, q.astype(np.int64))
    assert np.abs(signed).max() == level
    # Value = signed code * step, the grid of an int8 kernel; error at most half a step.
    np.testing.assert_allclose(got, q * step, rtol=1e-5, atol=1e-6 * np.abs(x).max())
    assert np.all(np.abs(got - x) <= step / 2 * (1 + 1e-5) + 1e-7)
    # The packed format's alpha/beta express the same grid: beta = -level * step, alpha = step*(2^k-1).
    np.testing.assert_allclose(got_beta, -level * np.ravel(step), rtol=1e-6)
    np.testing.assert_allclose(got_alpha, np.ravel(step) * (2 ** bits - 1), rtol=1e-6)
    # A value of 0 is stored exactly as 0.
    zero_codes = got_codes[x == 0]
    assert np.all(zero_codes == level)


def test_symmetric_reload_is_bit_exact(graph, rng):
    """codes * (alpha * float32(1/(2^k-1))) + beta, the packed file's decoder, gives the graph's value."""
    x = rng.normal(size=(5, 7)).astype(np.float32)
    layout = ops.GroupLayout("channel", channel_axes=(1,))
    tensor = tf.constant(x)
    with new_session(graph) as sess:
        got, (codes, alpha, beta) = sess.run([step_ops.quantize_weight_symmetric(tensor, 4, layout),
                                              step_ops.symmetric_weight_codes(tensor, 4, layout)])
    decoded = codes.astype(np.float32) * (alpha * np.float32(1.0 / 15)).astype(np.float32) + beta
    np.testing.assert_array_equal(decoded, got)


def test_symmetric_gradient_is_straight_through(graph, rng):
    x = tf.constant(rng.normal(size=(4, 3)).astype(np.float32))
    y = step_ops.quantize_weight_symmetric(x, 3)
    grad, = tf.gradients(tf.reduce_sum(y * 2.0), [x])
    with new_session(graph) as sess:
        np.testing.assert_array_equal(sess.run(grad), np.full((4, 3), 2.0, np.float32))


def test_all_zero_group_stays_zero(graph):
    x = np.zeros((3, 2), np.float32)
    x[:, 1] = [1.0, -2.0, 0.5]
    y = step_ops.quantize_weight_symmetric(tf.constant(x), 4, ops.GroupLayout("channel", channel_axes=(1,)))
    with new_session(graph) as sess:
        got = sess.run(y)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[:, 0], 0.0)


def test_quantize_graph_uses_the_symmetric_grid(graph, rng):
    w_value = rng.normal(size=(6, 5)).astype(np.float32)
    x = tf1.placeholder(tf.float32, [None, 6])
    w = tf1.get_variable("w", initializer=w_value)
    tf.matmul(x, w, name="mm")
    config = tfquant.QuantConfig(weight_bits=4, quantize_all_layers=True, weight_scheme="symmetric",
                                 use_buckets=True, bucket_type="channel")
    report = tfquant.quantize_graph(graph, config, is_training=False)
    assert report.config["weight_scheme"] == "symmetric"
    weight = graph.get_operation_by_name("mm").inputs[1]
    with new_session(graph) as sess:
        sess.run(tf1.global_variables_initializer())
        got = sess.run(weight)
    q, step = _symmetric_np(w_value, 4, 1)
    np.testing.assert_allclose(got, q * step, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_scheme="signed"), "weight_scheme='signed' is not valid"),
    (dict(weight_scheme="symmetric", weight_bits=1), "weight_bits=1 is not valid with weight_scheme='symmetric'"),
    (dict(weight_scheme="symmetric", weight_range="lsq"), "weight_range='lsq'; expected weight_range='minmax'"),
    (dict(freeze_bn_delay=-1), "freeze_bn_delay=-1 is not valid"),
    (dict(fold_batch_norms="yes"), "fold_batch_norms='yes' is not valid"),
])
def test_config_refuses_bad_deploy_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tfquant.QuantConfig(**kwargs)


@pytest.mark.parametrize("shape, axes", [((3, 3, 4, 5), (3,)), ((3, 3, 4, 2), (2, 3)), ((5, 6), (0,)), ((6, 7), None)])
def test_weight_step_is_the_grids_step_per_output_channel(graph, shape, axes):
    x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    layout = ops.GroupLayout("channel", channel_axes=axes) if axes else ops.GroupLayout()
    with new_session(graph) as sess:
        step, quantized = sess.run([step_ops.symmetric_weight_step(tf.constant(x), 8, layout),
                                    step_ops.quantize_weight_symmetric(tf.constant(x), 8, layout)])
    kept = [a for a in range(len(shape)) if a in (axes or ())]
    moved = np.moveaxis(x, kept, list(range(len(kept)))).reshape(int(np.prod([shape[a] for a in kept])), -1)
    np.testing.assert_allclose(step, np.abs(moved).max(axis=1) / 127 if axes else np.abs(x).max() / 127, rtol=1e-6)
    # Every quantized weight is an integer multiple of its channel's step (the depthwise channel of input
    # channel c and multiplier m being c * multiplier + m, as the op's outputs are ordered).
    codes = np.moveaxis(quantized, kept, list(range(len(kept)))).reshape(len(np.atleast_1d(step)), -1)
    codes = codes / np.atleast_1d(step)[:, None]
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)


def test_bias_on_the_int32_grid(graph):
    bias = np.array([0.1234567, -2.6e-4, 0.0, 3.0, -1e12], np.float32)
    step = np.array([1e-3, 1e-4, 1e-3, 0.7, 1e-3], np.float32)
    value = tf1.placeholder(tf.float32, [5])
    quantized = step_ops.quantize_bias(value, tf.constant(step))
    grad, = tf.gradients(tf.reduce_sum(quantized * np.arange(5, dtype=np.float32)), [value])
    with new_session(graph) as sess:
        got, got_grad = sess.run([quantized, grad], {value: bias})
    expected = np.clip(np.round(bias.astype(np.float64) / step), -(2 ** 31 - 1), 2 ** 31 - 1) * step
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(got_grad, np.arange(5))  # straight through
