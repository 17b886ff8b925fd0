"""Learned ranges: PACT, LSQ and LSQ+ gradients against the papers' formulas and NumPy finite differences,
first-batch initialisation, storage accounting, and bit-exact packed export of LSQ weights."""
import os

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tests.tfquant.test_export import IMAGE_SHAPE, _quantized_eval, _save_quantized, _synthetic_data, forward
from tfquant import ops, ranges, step_ops
from tfquant.export import frozen_graph, model_export

tf1 = tf.compat.v1
FD_STEP = 1e-3


def _central_difference(function, value):
    """d function / d value by a central difference in float64."""
    return (function(value + FD_STEP) - function(value - FD_STEP)) / (2 * FD_STEP)


def _activation_graph(shape, act_range, bits, op_type):
    """A training graph quantizing a placeholder as the output of an `op_type` activation."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, shape)
        upstream = tf1.placeholder(tf.float32, shape)
        quantized, params = ranges.quantize_activation(x, bits, act_range, True, 0.99, "act", op_type)
        loss = tf.reduce_sum(upstream * quantized)
        grads = tf.gradients(loss, [x] + params.parameters)
    return graph, x, upstream, quantized, params, grads


def _run_initialised(graph, x, quantized, params, first_batch, values, fetches, feed):
    """Run one training forward on `first_batch` (initialising), set the parameters to `values`, fetch."""
    with new_session(graph) as sess:
        sess.run(tf1.global_variables_initializer())
        sess.run(quantized, {x: first_batch} if x is not None else {})
        for variable, value in zip(params.parameters, values):
            variable.load(np.float32(value), sess)
        return sess.run(fetches, feed)


def _grid_values(rng, step, q_low, q_high, count):
    """Values x = v * step with v away from rounding midpoints, some below and above the grid."""
    inside = rng.integers(q_low, q_high, size=count) + rng.choice([0.15, 0.3, 0.7, 0.85], size=count)
    outside = np.array([q_high + 1.7, q_high + 3.2, q_low - 1.6, q_low - 2.9])
    return ((np.concatenate([inside, outside])) * step).astype(np.float32)


@pytest.mark.parametrize("op_type", ["Relu", "Tanh"])
def test_pact_alpha_gradient(rng, op_type):
    non_negative = op_type == "Relu"
    x_value = rng.normal(0.0, 2.0, size=[4, 6]).astype(np.float32)
    if non_negative:
        x_value = np.maximum(x_value, 0.0)
    up = rng.normal(size=x_value.shape).astype(np.float32)
    alpha = 1.3
    # no element within the finite-difference step of a clip boundary
    x_value[np.abs(np.abs(x_value) - alpha) < 10 * FD_STEP] += 0.05
    graph, x, upstream, quantized, params, grads = _activation_graph(x_value.shape, "pact", 3, op_type)
    dx, dalpha = _run_initialised(graph, x, quantized, params, x_value, [alpha], grads,
                                  {x: x_value, upstream: up})
    # PACT: d y_q / d alpha = 1 where x >= alpha (and -1 where x <= -alpha for the symmetric clip).
    lower = 0.0 if non_negative else -alpha
    published = up[x_value >= alpha].sum() - (0.0 if non_negative else up[x_value <= -alpha].sum())
    assert dalpha == pytest.approx(published, rel=1e-5, abs=1e-5)
    # ... which is the exact derivative of the clip the quantizer is straight-through over.
    x64, up64 = x_value.astype(np.float64), up.astype(np.float64)
    if non_negative:
        clip = lambda a: np.sum(up64 * np.clip(x64, 0.0, a))  # noqa: E731
    else:
        clip = lambda a: np.sum(up64 * np.clip(x64, -a, a))  # noqa: E731
    assert dalpha == pytest.approx(_central_difference(clip, alpha), rel=1e-4, abs=1e-4)
    np.testing.assert_allclose(dx, up * ((x_value > lower) & (x_value < alpha)), rtol=1e-6)


def test_pact_forward_and_decay(rng):
    x_value = np.abs(rng.normal(0.0, 2.0, size=[3, 5])).astype(np.float32)
    x_value[0, 0] = 20.0  # a rare outlier a 2-bit grid should not be stretched to
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, x_value.shape)
        quantized, params = ranges.quantize_activation(x, 2, "pact", True, 0.99, "act", "Relu", pact_decay=0.5)
        (decay,) = tf1.get_collection(tf1.GraphKeys.REGULARIZATION_LOSSES)
    with new_session(graph) as sess:
        sess.run(tf1.global_variables_initializer())
        first = sess.run(quantized, {x: x_value})
        params.parameters[0].load(1.5, sess)
        out, decay_value = sess.run([quantized, decay], {x: x_value})
    # first batch: alpha = Q_P * LSQ's initial step 2<|x|>/sqrt(Q_P), at most the batch max
    alpha = min(x_value.max(), 2 * np.sqrt(3) * x_value.mean())
    levels = np.round(np.minimum(x_value, alpha) / alpha * 3) * np.float32(alpha / 3)
    np.testing.assert_allclose(first, levels, rtol=1e-5)
    assert alpha < x_value.max()  # the cap is not what decides here
    np.testing.assert_allclose(out, np.round(np.minimum(x_value, 1.5) / 1.5 * 3) * 0.5, rtol=1e-6)
    assert decay_value == pytest.approx(0.5 * 1.5 ** 2 / 2)


def _lsq_reference_grad(v, q_n, q_p):
    """The LSQ paper's d q / d s for v = x / s: round(v) - v inside, -Q_N below, Q_P above."""
    return np.where(v <= -q_n, -q_n, np.where(v >= q_p, q_p, np.round(v) - v))


def test_lsq_activation_step_gradient(rng):
    bits, step = 2, 0.4
    q_n, q_p = step_ops.unsigned_grid(bits)
    x_value = np.abs(_grid_values(rng, step, 0, int(q_p), 20)).reshape(4, 6)
    up = rng.normal(size=x_value.shape).astype(np.float32)
    graph, x, upstream, quantized, params, grads = _activation_graph(x_value.shape, "lsq", bits, "Relu")
    q, (dx, dstep) = _run_initialised(graph, x, quantized, params, x_value, [step], [quantized, grads],
                                      {x: x_value, upstream: up})
    v = x_value.astype(np.float64) / step
    np.testing.assert_allclose(q, np.clip(np.round(v), q_n, q_p) * step, rtol=1e-6)
    g = 1.0 / np.sqrt(x_value.shape[1] * q_p)  # N = elements per example
    assert dstep == pytest.approx(g * np.sum(up * _lsq_reference_grad(v, q_n, q_p)), rel=1e-4)
    # Finite differences see round() as locally constant; LSQ adds the straight-through -v inside.
    x64, up64 = x_value.astype(np.float64), up.astype(np.float64)
    numeric = _central_difference(lambda s: np.sum(up64 * np.clip(np.round(x64 / s), q_n, q_p) * s), step)
    inside = (v > -q_n) & (v < q_p)
    assert dstep == pytest.approx(g * (numeric - np.sum(up64 * v * inside)), rel=1e-4)
    np.testing.assert_allclose(dx, up * inside, rtol=1e-6)


def test_lsq_plus_offset_and_step_gradient(rng):
    bits, step, offset = 3, 0.25, -0.6
    q_n, q_p = step_ops.unsigned_grid(bits)
    x_value = (_grid_values(rng, step, 0, int(q_p), 20) + np.float32(offset)).reshape(4, 6)
    up = rng.normal(size=x_value.shape).astype(np.float32)
    graph, x, upstream, quantized, params, grads = _activation_graph(x_value.shape, "lsq", bits, "Tanh")
    assert [v.op.name for v in params.parameters] == ["act/lsq_step", "act/lsq_offset"]
    q, (dx, dstep, doffset) = _run_initialised(graph, x, quantized, params, x_value, [step, offset],
                                               [quantized, grads], {x: x_value, upstream: up})
    v = (x_value.astype(np.float64) - offset) / step
    np.testing.assert_allclose(q, np.clip(np.round(v), q_n, q_p) * step + offset, rtol=1e-5, atol=1e-6)
    g = 1.0 / np.sqrt(x_value.shape[1] * q_p)
    inside = (v > -q_n) & (v < q_p)
    assert dstep == pytest.approx(g * np.sum(up * _lsq_reference_grad(v, q_n, q_p)), rel=1e-4)
    # LSQ+: the offset's gradient is 0 inside the grid and 1 outside
    assert doffset == pytest.approx(g * np.sum(up[~inside]), rel=1e-4)
    x64, up64 = x_value.astype(np.float64), up.astype(np.float64)
    quantizer = lambda s, b: np.sum(up64 * (np.clip(np.round((x64 - b) / s), q_n, q_p) * s + b))  # noqa: E731
    # inside, round() is locally constant so q moves with b; the straight-through term -1 cancels it
    numeric = _central_difference(lambda b: quantizer(step, b), offset)
    assert doffset == pytest.approx(g * (numeric - np.sum(up64 * inside)), rel=1e-4)
    numeric = _central_difference(lambda s: quantizer(s, offset), step)
    assert dstep == pytest.approx(g * (numeric - np.sum(up64 * v * inside)), rel=1e-4)
    np.testing.assert_allclose(dx, up * inside, rtol=1e-6)


@pytest.mark.parametrize("layout,steps", [
    (ops.GroupLayout(), [0.3]),
    (ops.GroupLayout("channel", channel_axes=(3,)), [0.3, 0.5, 0.2, 0.7]),
    (ops.GroupLayout("split", bucket_size=20), [0.3, 0.5, 0.2, 0.7]),
], ids=["none", "channel", "split"])
def test_lsq_weight_step_gradient(rng, layout, steps):
    bits, shape = 3, [2, 2, 5, 4]
    q_n, q_p = step_ops.signed_grid(bits)
    assert (q_n, q_p) == (4.0, 3.0)
    group_of = _group_index(shape, layout)
    step_of = np.asarray(steps, np.float64)[group_of]
    v_value = _grid_values(rng, 1.0, -int(q_n), int(q_p), int(np.prod(shape)) - 4)
    rng.shuffle(v_value)
    w_value = (v_value.reshape(shape) * step_of).astype(np.float32)
    up = rng.normal(size=shape).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        w = tf1.get_variable("w", shape, initializer=tf1.constant_initializer(w_value))
        quantized, params = ranges.quantize_weight_lsq(w.read_value(), bits, layout, "w_quant", True)
        grads = tf.gradients(tf.reduce_sum(up * quantized), [w] + params.parameters)
    q, (dw, dstep) = _run_initialised(graph, None, quantized, params, None, [steps], [quantized, grads], {})
    v = w_value.astype(np.float64) / step_of
    np.testing.assert_allclose(q, np.clip(np.round(v), -q_n, q_p) * step_of, rtol=1e-6, atol=1e-7)
    elements = 20 if layout.kind == "split" else int(np.prod(shape)) // len(steps)
    g = 1.0 / np.sqrt(elements * q_p)
    published = np.bincount(group_of.ravel(), (up * _lsq_reference_grad(v, q_n, q_p)).ravel())
    np.testing.assert_allclose(dstep, g * published, rtol=1e-4, atol=1e-6)
    inside = (v > -q_n) & (v < q_p)
    w64, up64 = w_value.astype(np.float64), up.astype(np.float64)
    for group, value in enumerate(steps):
        mask = group_of == group

        def quantizer(s, mask=mask):
            return np.sum(up64[mask] * np.clip(np.round(w64[mask] / s), -q_n, q_p) * s)
        numeric = _central_difference(quantizer, value) - np.sum((up64 * v * inside)[mask])
        assert dstep[group] == pytest.approx(g * numeric, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(dw, up * inside, rtol=1e-6)


def _group_index(shape, layout):
    """The range group of every element, by NumPy (row-major channel numbering, split pieces)."""
    if layout.kind == "channel":
        return np.broadcast_to(np.arange(shape[3]), shape)
    if layout.kind == "split":
        return (np.arange(int(np.prod(shape))) // layout.bucket_size).reshape(shape)
    return np.zeros(shape, np.int64)


def _squared_error(x, step, q_n, q_p):
    """||Q(x) - x||^2 on the signed grid -q_n .. q_p times step, in float64."""
    x = np.asarray(x, np.float64)
    return float(np.sum((np.clip(np.round(x / step), -q_n, q_p) * step - x) ** 2))


def _searched_error(x, q_n, q_p, points=2000):
    """The smallest error over `points` steps spread evenly up to max|x| / q_p (brute force)."""
    largest = np.abs(x).max() / q_p
    return min(_squared_error(x, largest * j / points, q_n, q_p) for j in range(1, points + 1))


@pytest.mark.parametrize("bits", [2, 3, 4])  # finer grids: a sample's few far-tail values decide the optimum
def test_gaussian_step_ratio_against_sampled_search(bits):
    q_n, q_p = step_ops.signed_grid(bits)
    sample = np.random.default_rng(bits).normal(size=200000)
    ratio = step_ops.gaussian_step_ratio(q_n, q_p)
    # The error curve is flat at its minimum, so compare errors rather than the arg-min.
    assert _squared_error(sample, ratio, q_n, q_p) <= 1.002 * _searched_error(sample, q_n, q_p, 800)


@pytest.mark.parametrize("layout,shape", [
    (ops.GroupLayout(), [3, 3, 16, 4]),
    (ops.GroupLayout("channel", channel_axes=(3,)), [3, 3, 16, 6]),
    (ops.GroupLayout("split", bucket_size=100), [3, 3, 16, 4]),
], ids=["none", "channel", "split"])
@pytest.mark.parametrize("bits,slack", [(2, 1.01), (3, 1.04), (4, 1.06)])  # 8 bits on 144 values: a jagged error curve
def test_lsq_weight_initial_step_against_brute_force(rng, layout, shape, bits, slack):
    # Normal, heavier-tailed (Laplace) and skewed groups, as trained weights can be.
    value = np.concatenate([rng.normal(size=shape[:3] + [2]), rng.laplace(size=shape[:3] + [1]),
                            rng.exponential(size=shape[:3] + [shape[3] - 3]) - 0.3], axis=3).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        steps = ranges.lsq_weight_initial(tf.constant(value), bits, layout)
    with new_session(graph) as sess:
        steps = sess.run(steps)
    q_n, q_p = step_ops.signed_grid(bits)
    group_of = _group_index(shape, layout)
    assert steps.shape == (group_of.max() + 1,)
    for group, step in enumerate(steps):
        x = value[group_of == group]
        error, searched = _squared_error(x, step, q_n, q_p), _searched_error(x, q_n, q_p)
        assert error <= slack * searched, (group, error, searched)
        # LSQ's published start 2<|w|>/sqrt(Q_P) never does better.
        assert error <= _squared_error(x, 2 * np.abs(x).mean() / np.sqrt(q_p), q_n, q_p) * (1 + 1e-6)


def test_lsq_weight_initial_step_of_a_zero_group():
    value = np.zeros([2, 2, 3, 2], np.float32)
    value[..., 1] = np.arange(12).reshape([2, 2, 3]) - 5.0
    graph = tf.Graph()
    with graph.as_default():
        steps = ranges.lsq_weight_initial(tf.constant(value), 2, ops.GroupLayout("channel", channel_axes=(3,)))
    with new_session(graph) as sess:
        steps = sess.run(steps)
    assert steps[0] == np.float32(step_ops.MIN_STEP)
    assert _squared_error(value[..., 1], steps[1], 2, 1) <= _searched_error(value[..., 1], 2, 1)


def _initial_steps(w_value, bits):
    """lsq_weight_initial's per-channel steps of a constant (checked against brute force above)."""
    graph = tf.Graph()
    with graph.as_default():
        steps = ranges.lsq_weight_initial(tf.constant(w_value), bits, ops.GroupLayout("channel", channel_axes=(3,)))
    with new_session(graph) as sess:
        return sess.run(steps)


def _least_squares_reference(values, q_p, iterations=3, starts=12):
    """NumPy version of step_ops.least_squares_step on the unsigned grid 0..q_p (one step for all values)."""
    values = np.asarray(values, np.float32).ravel()
    candidates = [np.float32(values.max() / q_p * 2.0 ** (-0.25 * j)) for j in range(starts)]
    candidates.append(np.float32(2 * np.abs(values).mean() / np.sqrt(q_p)))
    best, best_error = None, None
    for step in candidates:
        for _ in range(iterations):
            codes = np.clip(np.round(values / step), 0, q_p)
            if np.sum(codes * codes) > 0:
                step = np.float32(np.sum(values * codes) / np.sum(codes * codes))
        error = _squared_error(values, step, 0, q_p)
        if best_error is None or error < best_error:
            best, best_error = step, error
    return best


def test_activation_sample_is_strided_and_bounded():
    graph = tf.Graph()
    with graph.as_default():
        small = ranges._sample(tf.reshape(tf.range(100.0), [4, 25]), limit=1000)
        large = ranges._sample(tf.reshape(tf.range(10000.0), [100, 100]), limit=1000)
    with new_session(graph) as sess:
        small, large = sess.run([small, large])
    np.testing.assert_array_equal(small, np.arange(100.0))
    np.testing.assert_array_equal(large, np.arange(0.0, 10000.0, 10.0))  # every 10th, all of the batch


def test_lsq_activation_evaluated_before_training_uses_lsq_start(rng):
    # An evaluation graph has no first training batch to fit on: until a step has stored one, it uses
    # LSQ's 2<|x|>/sqrt(Q_P) of the batch it is given.
    x_value = rng.normal(size=[8, 10]).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [8, 10])
        quantized, params = ranges.quantize_activation(tf.nn.relu(x), 2, "lsq", False, 0.99, "lsq", "Relu")
    with new_session(graph) as sess:
        sess.run(tf1.global_variables_initializer())
        got = sess.run(quantized, {x: x_value})
    relu = np.maximum(x_value, 0).astype(np.float64)
    step = 2 * relu.mean() / np.sqrt(3)
    np.testing.assert_allclose(got, np.clip(np.round(relu / step), 0, 3) * step, rtol=1e-5, atol=1e-6)


def test_first_batch_initialisation_is_stored_once(rng):
    first = rng.normal(size=[8, 10]).astype(np.float32)
    second = 3.0 * rng.normal(size=[8, 10]).astype(np.float32)
    w_value = rng.normal(size=[3, 3, 2, 4]).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [8, 10])
        pact, pact_params = ranges.quantize_activation(tf.nn.relu(x), 4, "pact", True, 0.99, "pact", "Relu")
        lsq, lsq_params = ranges.quantize_activation(tf.nn.relu(x), 4, "lsq", True, 0.99, "lsq", "Relu")
        plus, plus_params = ranges.quantize_activation(tf.tanh(x), 4, "lsq", True, 0.99, "plus", "Tanh")
        w = tf.constant(w_value)
        layout = ops.GroupLayout("channel", channel_axes=(3,))
        weight, weight_params = ranges.quantize_weight_lsq(w, 2, layout, "w_quant", True)
        outputs = [pact, lsq, plus, weight]
        all_params = [pact_params, lsq_params, plus_params, weight_params]
    with new_session(graph) as sess:
        sess.run(tf1.global_variables_initializer())
        assert all(sess.run(p.init_steps) == 0 for p in all_params)
        sess.run(outputs, {x: first})
        stored = sess.run([p.parameters for p in all_params])
        sess.run(outputs, {x: second})  # a later batch never re-initialises
        again = sess.run([p.parameters for p in all_params])
        counters = sess.run([p.init_steps for p in all_params])
    relu, tanh = np.maximum(first, 0), np.tanh(first)
    expected = [[relu.max()], [_least_squares_reference(relu, 15)],
                [_least_squares_reference(tanh - tanh.min(), 15), tanh.min()],
                [_initial_steps(w_value, 2)]]
    for got, want in zip(stored, expected):
        for value, reference in zip(got, want):
            np.testing.assert_allclose(value, reference, rtol=1e-5)
    # The LSQ activations start at a step of least squared error on the first batch, never above LSQ's
    # 2<|x|>/sqrt(Q_P) start's.
    for values, step in [(relu, stored[1][0]), (tanh - tanh.min(), stored[2][0])]:
        error = _squared_error(values, step, 0, 15)
        assert error <= _squared_error(values, 2 * values.mean() / np.sqrt(15), 0, 15) * (1 + 1e-6)
    for got, want in zip(again, stored):
        for value, reference in zip(got, want):
            assert np.array_equal(value, reference)
    assert counters == [2, 2, 2, 2]


@pytest.mark.parametrize("bits, slack", [(2, 1.01), (3, 1.02), (4, 1.04)])
def test_lsq_activation_start_against_brute_force(rng, bits, slack):
    x_value = rng.normal(size=[32, 64]).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [32, 64])
        quantized, params = ranges.quantize_activation(tf.nn.relu(x), bits, "lsq", True, 0.99, "lsq", "Relu")
    with new_session(graph) as sess:
        sess.run(tf1.global_variables_initializer())
        sess.run(quantized, {x: x_value})
        step = sess.run(params.parameters[0])
    relu, q_p = np.maximum(x_value, 0), 2 ** bits - 1
    error = _squared_error(relu, step, 0, q_p)
    assert error <= slack * _searched_error(relu, 0, q_p)
    assert error <= _squared_error(relu, 2 * relu.mean() / np.sqrt(q_p), 0, q_p) * (1 + 1e-6)


def test_lsq_weights_need_two_bits():
    with pytest.raises(ValueError, match=r"weight_bits=1 is not valid with weight_range='lsq'"):
        tfquant.QuantConfig(weight_bits=1, weight_range="lsq")
    with pytest.raises(ValueError, match=r"layer_bits\[1\]=1 is not valid"):
        tfquant.QuantConfig(layer_bits=[2, 1], weight_range="lsq")
    with pytest.raises(ValueError, match=r"pact_decay=-1 is not valid; expected a finite number >= 0"):
        tfquant.QuantConfig(pact_decay=-1)
    with pytest.raises(ValueError, match=r"pact_decay=nan is not valid"):
        tfquant.QuantConfig(pact_decay=float("nan"))
    with pytest.raises(ValueError, match=r"weight_range='max' is not valid; expected one of 'minmax', 'lsq'"):
        tfquant.QuantConfig(weight_range="max")
    assert tfquant.QuantConfig(weight_bits=1).weight_range == "minmax"


def _groups(value, layer):
    """The values of each range group of a weight, by NumPy."""
    if layer.bucket_type == "channel":
        return list(value.reshape(-1, value.shape[-1]).T)
    flat = value.ravel()
    if layer.bucket_type == "split":
        return [flat[start:start + layer.bucket_size] for start in range(0, flat.size, layer.bucket_size)]
    return [flat]


def _training_graph_weights(checkpoint, config):
    """{weight variable: the quantized weight the training graph feeds its op} after restoring."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None] + IMAGE_SHAPE)
        forward(images, is_training=True)
        report = tfquant.quantize_graph(graph, config, is_training=True)
        quantized = {layer.weight_variable: graph.get_operation_by_name(layer.name).inputs[layer.input_index]
                     for layer in report.weight_layers if layer.quantized}
        saver = tf1.train.Saver()
    with new_session(graph) as sess:
        saver.restore(sess, checkpoint)
        return sess.run(quantized)


@pytest.mark.parametrize("weight_range,act_range,layout", [
    ("minmax", "ema", dict(use_buckets=True, bucket_type="channel")),
    ("lsq", "lsq", dict(use_buckets=True, bucket_type="channel")),
    ("lsq", "pact", dict(use_buckets=True, bucket_type="split", bucket_size=40)),
    ("lsq", "lsq", dict(use_buckets=False)),
])
def test_learned_ranges_export_bit_exact(tmp_path, rng, weight_range, act_range, layout):
    config = tfquant.QuantConfig(layer_bits=[4, 2, 3, 2], activation_bits=3, quantize_all_layers=True,
                                 weight_range=weight_range, act_range=act_range, **layout)
    checkpoint, report_path = _save_quantized(str(tmp_path), config, rng, train_steps=25)
    report = tfquant.QuantReport.from_json(open(report_path).read())
    reader = tf.train.load_checkpoint(checkpoint)
    others = {record.name for record in report.other_variables}
    for layer in report.weight_layers:
        # the learned step sizes are the layer's range storage: 2 x 32 bits per group, as alpha, beta
        assert layer.bucket_storage_bits == layer.num_groups * 64
        if weight_range == "lsq":
            step_name = layer.weight_variable + "_quant/lsq_step"
            assert layer.range_variables == [step_name] and step_name not in others
            step = reader.get_tensor(step_name)
            assert step.shape == (layer.num_groups,)
            assert reader.get_tensor(layer.weight_variable + "_quant/init_steps") == 25
    if act_range in ("pact", "lsq"):
        for layer in report.activation_layers:
            assert layer.range_variables and set(layer.range_variables) <= others

    out = tmp_path / "model.tfq"
    stats = model_export.pack_checkpoint(checkpoint, report_path, out)
    assert stats["accounted_bits"] == stats["total_storage_bits"] == report.total_storage_bits
    # pack_checkpoint refuses a checkpoint with an unrecorded range, so reaching here means all were recorded.
    weights, metadata = model_export.load_packed_weights(out)
    test_images = _synthetic_data(np.random.default_rng(11), 100)[0]
    logits, eval_weights = _quantized_eval(checkpoint, config, test_images)
    train_weights = _training_graph_weights(checkpoint, config)
    assert set(eval_weights) == set(train_weights) and len(train_weights) == 4
    for name, expected in train_weights.items():
        assert np.array_equal(weights[name].view(np.uint32), expected.view(np.uint32)), name
        assert np.array_equal(eval_weights[name].view(np.uint32), expected.view(np.uint32)), name
        layer = [layer for layer in report.weight_layers if layer.weight_variable == name][0]
        assert all(len(np.unique(group)) <= 2 ** layer.bits for group in _groups(expected, layer))
    graph_def = frozen_graph.freeze_inference_graph(forward, weights, metadata["config"], [None] + IMAGE_SHAPE)
    frozen = frozen_graph.run_graph_def(graph_def, test_images)
    np.testing.assert_allclose(frozen, logits, rtol=1e-5, atol=1e-5)
    assert np.array_equal(frozen.argmax(1), logits.argmax(1))


def test_lsq_export_from_untrained_checkpoint_uses_initial_steps(tmp_path, rng):
    config = tfquant.QuantConfig(layer_bits=[2, 2, 3, 4], weight_range="lsq", quantize_all_layers=True,
                                 use_buckets=True, bucket_type="channel")
    directory = os.path.join(str(tmp_path), "untrained")
    os.makedirs(directory)
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None] + IMAGE_SHAPE)
        forward(images, is_training=False)
        report = tfquant.quantize_graph(graph, config, is_training=False)
        saver = tf1.train.Saver()
        with new_session(graph) as sess:
            sess.run(tf1.global_variables_initializer())
            checkpoint = saver.save(sess, os.path.join(directory, "model.ckpt"), global_step=0)
    out = tmp_path / "model.tfq"
    model_export.pack_checkpoint(checkpoint, report, out)
    weights, metadata = model_export.load_packed_weights(out)
    _, eval_weights = _quantized_eval(checkpoint, config, np.zeros([1] + IMAGE_SHAPE, np.float32))
    for name, expected in eval_weights.items():
        assert np.array_equal(weights[name].view(np.uint32), expected.view(np.uint32)), name
