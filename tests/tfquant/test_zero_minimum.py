"""Training graphs skip the quantizer's subtraction over the tensor when an activation's batch minimum is +0.0.

Values must stay bit for bit those of the plain formula (checked against a NumPy float32 reference of the folded
form, signed zeros included), and the subtraction must really not run when the minimum is +0.0 (checked in the
session's own trace).
"""
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import new_session
from tfquant import ops, ranges

tf1 = tf.compat.v1


def folded_reference(x, bits, lo, hi):
    """The graph's folded formula step by step in float32: round((x - lo) * (L / alpha)) * (alpha * f32(1/L)) + lo."""
    x, lo, hi = np.asarray(x, np.float32), np.float32(lo), np.float32(hi)
    levels = np.float32(2 ** bits - 1)
    alpha = np.maximum(hi - lo, np.float32(0.0)) + np.float32(1e-10)
    codes = np.round((x - lo) * (levels / alpha))
    return codes * (alpha * np.float32(1.0 / (2 ** bits - 1))) + lo


def bits_of(values):
    return np.asarray(values, np.float32).view(np.int32)


def cases(rng):
    relu = np.maximum(rng.normal(size=(6, 5, 5, 3)).astype(np.float32), np.float32(0.0))
    with_negative_zeros = relu.copy()
    with_negative_zeros[0, 0, 0, :] = np.float32(-0.0)
    normal = rng.normal(size=(6, 5, 5, 3)).astype(np.float32)
    return [(relu, 0.0), (with_negative_zeros, 0.0), (with_negative_zeros, -0.0), (normal, float(normal.min())),
            (np.abs(normal) + np.float32(0.25), float((np.abs(normal) + np.float32(0.25)).min())),
            (np.zeros((2, 3), np.float32), 0.0)]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_skipping_the_subtraction_changes_no_bit(rng, bits):
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, None)
        lo, hi = tf1.placeholder(tf.float32, []), tf1.placeholder(tf.float32, [])
        skipped = ops.quantize_in_range(x, bits, lo, hi, skip_plus_zero=True)
        plain = ops.quantize_in_range(x, bits, lo, hi)
        with new_session(graph) as sess:
            for values, minimum in cases(rng):
                feed = {x: values, lo: minimum, hi: float(values.max())}
                got_skipped, got_plain = sess.run([skipped, plain], feed)
                want = folded_reference(values, bits, minimum, values.max())
                np.testing.assert_array_equal(bits_of(got_skipped), bits_of(want))
                np.testing.assert_array_equal(bits_of(got_plain), bits_of(want))


def executed_big_subtractions(sess, quantized, feed, shape):
    """Names of the Sub ops the traced step ran whose output has `shape` (the pass over the tensor)."""
    metadata = tf1.RunMetadata()
    sess.run(quantized, feed, options=tf1.RunOptions(trace_level=tf1.RunOptions.FULL_TRACE), run_metadata=metadata)
    names = {op.name for op in sess.graph.get_operations()
             if op.type == "Sub" and op.outputs[0].shape.as_list() == list(shape)}
    return sorted(n.node_name for d in metadata.step_stats.dev_stats for n in d.node_stats if n.node_name in names)


@pytest.mark.parametrize("act_range", ["ema", "batch"])
def test_a_training_step_skips_the_pass_when_the_minimum_is_plus_zero(rng, monkeypatch, act_range):
    # The op chain's skip (training graphs use the fused kernels of tfquant.kernels when they are built).
    monkeypatch.setenv("TFQ_ACTIVATION_KERNELS", "0")
    shape = (4, 6, 6, 3)
    relu_batch = np.maximum(rng.normal(size=shape), 0.0).astype(np.float32)
    signed_batch = rng.normal(size=shape).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, shape)
        quantized, _ = ranges.quantize_activation(x, 4, act_range, True, 0.9, "layer/act_quant", "Relu")
        with new_session(graph) as sess:
            sess.run(tf1.global_variables_initializer())
            assert executed_big_subtractions(sess, quantized, {x: relu_batch}, shape) == []
            assert len(executed_big_subtractions(sess, quantized, {x: signed_batch}, shape)) == 1
            for batch in (relu_batch, signed_batch):
                got = sess.run(quantized, {x: batch})
                want = folded_reference(batch, 4, batch.min(), batch.max())
                np.testing.assert_array_equal(bits_of(got), bits_of(want))


def test_evaluation_graphs_keep_the_plain_subtraction():
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [2, 3])
        ranges.quantize_activation(x, 4, "ema", False, 0.9, "layer/act_quant", "Relu")
        types = {op.type for op in graph.get_operations()}
    # What is exported is built from evaluation graphs: no control flow there.
    assert "Sub" in types and not types & {"Switch", "Merge"}
