"""The quantization function against the NumPy reference, and its straight-through gradient."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tfquant import ops
from tests.conftest import new_session
from tests.tfquant.reference import assert_matches_reference, quantize_np


def _run(graph, fetches, feed=None):
    with new_session(graph) as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        return sess.run(fetches, feed)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("bucket_type", [None, "channel", "split"])
def test_uniform_quantize_matches_numpy(graph, rng, bits, bucket_type):
    x = rng.normal(size=(3, 3, 5, 7)).astype(np.float32)
    got = _run(graph, tfquant.uniform_quantize(tf.constant(x), bits, bucket_type, bucket_size=37))
    layout = bucket_type or "none"
    want = quantize_np(x, bits, layout, channel_axes=(3,), bucket_size=37)
    assert_matches_reference(got, want, x, bits)
    assert got.shape == x.shape


@pytest.mark.parametrize("bucket_type", [None, "channel", "split"])
def test_quantize_weight_widths_equals_each_width_alone(graph, rng, bucket_type):
    """One call for several widths (one min/max per group shared) gives each width's quantize_weight bit for bit,
    matches NumPy, and keeps 32 bits float."""
    x = rng.normal(size=(3, 3, 5, 7)).astype(np.float32)
    layout = ops.GroupLayout.from_bucket_type(bucket_type, (3,), 37)
    value = tf.constant(x)
    together = ops.quantize_weight_widths(value, [1, 2, 4, 8, 32], layout)
    alone = {bits: ops.quantize_weight(value, bits, layout) for bits in (1, 2, 4, 8)}
    got_together, got_alone = _run(graph, (together, alone))
    assert sorted(got_together) == [1, 2, 4, 8, 32]
    for bits in (1, 2, 4, 8):
        np.testing.assert_array_equal(got_together[bits], got_alone[bits])
        want = quantize_np(x, bits, bucket_type or "none", channel_axes=(3,), bucket_size=37)
        assert_matches_reference(got_together[bits], want, x, bits)
    np.testing.assert_array_equal(got_together[32], x)
    # Each width reads one shared min and max per group.
    assert len([op for op in graph.get_operations() if op.type == "Min"]) == 1 + len(alone)


def test_values_lie_on_the_grid_of_each_group(graph, rng):
    x = rng.uniform(-3, 5, size=(4, 6)).astype(np.float32)
    got = _run(graph, tfquant.uniform_quantize(tf.constant(x), 2, "channel"))
    for column in range(6):
        distinct = np.unique(got[:, column])
        assert len(distinct) <= 4
        assert distinct.min() >= x[:, column].min() - 1e-6
        assert distinct.max() <= x[:, column].max() + 1e-6


def test_split_padding_does_not_change_the_last_piece(graph):
    # 10 elements in pieces of 4: the last piece [8, 9] is padded; its range must stay [8, 9].
    x = np.arange(10, dtype=np.float32) * np.float32(0.37)
    got = _run(graph, tfquant.uniform_quantize(tf.constant(x), 1, "split", bucket_size=4))
    np.testing.assert_allclose(got[8:], x[8:], atol=1e-6)  # 1 bit: each end of a 2-element range is exact
    np.testing.assert_allclose(got, quantize_np(x, 1, "split", bucket_size=4), atol=1e-6)


def test_bits_32_is_identity(graph, rng):
    x = rng.normal(size=(5, 5)).astype(np.float32)
    tensor = tf.constant(x)
    assert tfquant.uniform_quantize(tensor, 32) is tensor


@pytest.mark.parametrize("bits", [0, 17, 33, "4", 2.0, True])
def test_uniform_quantize_rejects_bad_bits(graph, bits):
    with pytest.raises(ValueError, match="bits=.* is not a valid bit width; expected an integer from 1 to 16"):
        tfquant.uniform_quantize(tf.zeros([3]), bits)


def test_unknown_bucket_type_is_rejected(graph):
    with pytest.raises(ValueError, match="bucket_type='rows'"):
        tfquant.uniform_quantize(tf.zeros([3]), 4, "rows")


@pytest.mark.parametrize("bucket_type", [None, "channel", "split"])
def test_straight_through_gradient_is_identity(graph, rng, bucket_type):
    x = rng.normal(size=(6, 9)).astype(np.float32)
    upstream = rng.normal(size=(6, 9)).astype(np.float32)
    variable = tf.compat.v1.get_variable("w", initializer=x)
    quantized = tfquant.uniform_quantize(variable, 3, bucket_type, bucket_size=10)
    grad, = tf.gradients(tf.reduce_sum(quantized * upstream), [variable])
    # The rounding op's gradient is overridden to Identity; alpha and beta take no gradient.
    np.testing.assert_allclose(_run(graph, grad), upstream, rtol=1e-5, atol=1e-6)


def test_gradient_without_override_would_be_zero(graph, rng):
    # Guards the test above: a plain Round has no gradient, so the override is what makes it flow.
    x = tf.constant(rng.normal(size=(4,)).astype(np.float32))
    assert tf.gradients(tf.reduce_sum(tf.round(x)), [x]) == [None]


@pytest.mark.parametrize("bits", [3, 8])
def test_weight_codes_reconstruct_quantize_weight_exactly(graph, rng, bits):
    # A variable, not a constant, so grappler's arithmetic rewrites apply as they do in training.
    x = rng.normal(size=(3, 3, 16, 8)).astype(np.float32)
    variable = tf.compat.v1.get_variable("w", initializer=x)
    levels = 2 ** bits - 1
    for layout in (tfquant.GroupLayout(), tfquant.GroupLayout("channel", channel_axes=(2, 3)),
                   tfquant.GroupLayout("split", bucket_size=100)):
        codes, alpha, beta = tfquant.weight_codes(variable, bits, layout)
        quantized = tfquant.quantize_weight(variable, bits, layout)
        codes_v, alpha_v, beta_v, quantized_v = _run(graph, [codes, alpha, beta, quantized])
        assert codes_v.min() >= 0 and codes_v.max() <= levels
        assert alpha_v.shape == (layout.num_groups(x.shape),)
        if layout.kind == "channel":
            group = np.broadcast_to(np.arange(16 * 8).reshape(16, 8), x.shape)
        elif layout.kind == "split":
            group = (np.arange(x.size) // 100).reshape(x.shape)
        else:
            group = np.zeros(x.shape, dtype=int)
        np.testing.assert_allclose(alpha_v[group], x.max(axis=(0, 1), keepdims=True).repeat(3, 0).repeat(3, 1)
                                   - x.min(axis=(0, 1), keepdims=True) + 1e-10 if layout.kind == "channel"
                                   else alpha_v[group], rtol=1e-6)
        scale = alpha_v * np.float32(1.0 / levels)
        rebuilt = codes_v.astype(np.float32) * scale[group] + beta_v[group]
        assert np.array_equal(rebuilt.astype(np.float32), quantized_v)
