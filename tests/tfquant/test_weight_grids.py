"""The weight grids against NumPy: ternary and binary codes, scales and gradients, the packed decoding, the
integer-grid check, the choice from a config, and bit allocation measured on the run's own grid."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tfquant import ops, sensitivity, weight_grids

tf1 = tf.compat.v1
LAYOUTS = {"none": ops.GroupLayout(), "channel": ops.GroupLayout("channel", channel_axes=(1,))}


def _groups(x, layout):
    """x [rows, channels] as a list of (index mask, values) per range group."""
    if layout == "none":
        return [(np.ones(x.shape, bool), x.ravel())]
    return [(np.broadcast_to(np.arange(x.shape[1]) == c, x.shape), x[:, c]) for c in range(x.shape[1])]


def _ternary_np(x, layout):
    """TWN: threshold 0.7 mean|w| per group, scale = mean |w| above it; (signed codes, scale per element)."""
    signed, scale = np.zeros(x.shape), np.zeros(x.shape)
    for mask, values in _groups(x.astype(np.float64), layout):
        threshold = 0.7 * np.abs(values).mean()
        kept = np.abs(values) > threshold
        signed[mask] = np.sign(values) * kept
        scale[mask] = np.abs(values)[kept].mean()
    return signed, scale


def _binary_np(x, layout):
    """sign(w) (0 as +) times the group's mean |w|; (signed codes, scale per element)."""
    signed, scale = np.zeros(x.shape), np.zeros(x.shape)
    for mask, values in _groups(x.astype(np.float64), layout):
        signed[mask] = np.where(values >= 0, 1.0, -1.0)
        scale[mask] = np.abs(values).mean()
    return signed, scale


def _decode(codes, alpha, beta, bits, group_of):
    """The packed file's decoder in float32: codes * (alpha * float32(1/(2^k-1))) + beta."""
    scale = (np.asarray(alpha, np.float32) * np.float32(1.0 / (2 ** bits - 1)))[group_of]
    return codes.astype(np.float32) * scale + np.asarray(beta, np.float32)[group_of]


@pytest.mark.parametrize("name,bits,reference", [("ternary", 2, _ternary_np), ("binary", 1, _binary_np)])
@pytest.mark.parametrize("layout", ["none", "channel"])
def test_ternary_and_binary_match_numpy(graph, rng, name, bits, reference, layout):
    x = (rng.normal(size=(24, 5)) * rng.uniform(0.2, 3.0, size=5)).astype(np.float32)
    x[3, 2] = 0.0
    grid = weight_grids.GRIDS[name]()
    tensor = tf.constant(x)
    quantized, learned = grid.quantize(tensor, bits, LAYOUTS[layout])
    codes, alpha, beta = grid.codes(tensor, bits, LAYOUTS[layout])
    weights = tf.constant(rng.normal(size=x.shape).astype(np.float32))
    gradient = tf.gradients(tf.reduce_sum(quantized * weights), tensor)[0]
    with new_session(graph) as sess:
        got, got_codes, got_alpha, got_beta, got_gradient, upstream = sess.run(
            [quantized, codes, alpha, beta, gradient, weights])
    assert learned is None
    signed, scale = reference(x, layout)
    # Codes: the signed code shifted up by 1 (ternary: -1, 0, +1 -> 0, 1, 2; binary: -1, +1 -> 0, 1).
    np.testing.assert_array_equal(got_codes, (signed + 1 if name == "ternary" else (signed + 1) / 2).astype(np.int32))
    np.testing.assert_allclose(got, signed * scale, rtol=2e-6, atol=0)
    # The packed decoding is the graph's value bit for bit.
    group_of = np.zeros(x.shape, int) if layout == "none" else np.broadcast_to(np.arange(5), x.shape)
    np.testing.assert_array_equal(_decode(got_codes, got_alpha, got_beta, bits, group_of), got)
    # Straight-through gradient: dQ/dw = 1.
    np.testing.assert_array_equal(got_gradient, upstream)
    # Ternary groups are exactly an integer grid on their codes 0..2 (zero point 1); binary ones are not (its
    # zero point is half a step).
    used = np.arange(3) if name == "ternary" else None
    assert weight_grids.integer_groups(got_alpha, got_beta, bits, used).all() == (name == "ternary")


def test_integer_groups_against_brute_force():
    """A group is an integer grid when code * scale + beta == (code - z) * scale for an integer z, every code."""
    scale = np.float32(0.37)
    alpha = np.array([scale * 15, scale * 15, scale * 15], np.float32)
    step = alpha * np.float32(1.0 / 15)
    beta = np.array([-7 * step[0], -np.float32(0.4) * step[1], 0.0], np.float32)
    got = weight_grids.integer_groups(alpha, beta, 4)
    for group in range(3):
        exact = any(all(np.float32(c * step[group] + beta[group]) == np.float32((c - z) * step[group])
                        for c in range(16)) for z in range(16))
        assert got[group] == exact, group
    # Zero point 0.4 is no integer; zero point 0 always is; -7 steps is one here except where rounding differs.
    assert not got[1] and got[2]
    np.testing.assert_allclose(weight_grids.scale_zero_point(alpha, beta, 4)[1], [7, 0.4, 0], rtol=1e-6)


def test_grid_of_a_config_and_of_a_report():
    assert isinstance(weight_grids.for_config(tfquant.QuantConfig()), weight_grids.MinMaxGrid)
    assert isinstance(weight_grids.for_config(tfquant.QuantConfig(weight_scheme="symmetric")),
                      weight_grids.SymmetricGrid)
    assert isinstance(weight_grids.for_config(tfquant.QuantConfig(weight_range="lsq")), weight_grids.LsqGrid)
    assert isinstance(weight_grids.for_config(tfquant.QuantConfig(weight_bits=2, weight_range="ternary")),
                      weight_grids.TernaryGrid)
    assert isinstance(weight_grids.for_config({"weight_range": "binary"}), weight_grids.BinaryGrid)
    assert isinstance(weight_grids.for_config({}), weight_grids.MinMaxGrid)  # a report of an older tfquant
    assert [weight_grids.GRIDS[name]().bit_range for name in ("minmax", "lsq", "ternary", "binary")] == [
        (1, 16), (2, 16), (2, 2), (1, 1)]


@pytest.mark.parametrize("settings,message", [
    (dict(weight_range="ternary"), "weight_bits=4 is not valid with weight_range='ternary'; expected 2 bits, or 32"),
    (dict(weight_range="binary", weight_bits=2), "weight_bits=2 is not valid with weight_range='binary'; expected 1"),
    (dict(weight_range="ternary", weight_bits=2, layer_bits=[2, 3]), r"layer_bits\[1\]=3 is not valid"),
    (dict(weight_range="binary", weight_bits=1, weight_overrides=[("w.*", 4)]), "weight_overrides 'w.*'=4"),
])
def test_config_refuses_widths_a_grid_lacks(settings, message):
    with pytest.raises(ValueError, match=message):
        tfquant.QuantConfig(**settings)
    tfquant.QuantConfig(weight_range="ternary", weight_bits=2, layer_bits=[2, 32])
    tfquant.QuantConfig(weight_range="binary", weight_bits=1)


def _toy(rng):
    """Two dense layers with a loss; weights with an outlier, so min/max and symmetric grids disagree."""
    w1 = rng.normal(0, 0.5, (6, 8)).astype(np.float32)
    w1[0, 0] = 4.0
    w2 = rng.normal(0, 2.0, (8, 4)).astype(np.float32)
    x = rng.uniform(-1, 1, (32, 6)).astype(np.float32)
    labels = np.argmax(np.maximum(x @ w1, 0) @ w2, axis=1)
    graph = tf.Graph()
    with graph.as_default():
        images, label_ph = tf1.placeholder(tf.float32, [None, 6]), tf1.placeholder(tf.int64, [None])
        v1, v2 = tf1.get_variable("w1", initializer=w1), tf1.get_variable("w2", initializer=w2)
        logits = tf.matmul(tf.nn.relu(tf.matmul(images, v1)), v2)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=label_ph, logits=logits))
    return graph, loss, {images: x, label_ph: labels}, (w1, w2, x, labels)


def _np_loss(w1, w2, x, labels):
    logits = np.maximum(x @ w1, 0) @ w2
    logits = logits - logits.max(axis=1, keepdims=True)
    return float(-(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)))[np.arange(len(labels)), labels].mean())


def _symmetric_np(w, bits):
    level = 2 ** (bits - 1) - 1
    step = np.abs(w).max() / level
    return np.clip(np.round(w / step), -level, level) * step


@pytest.mark.parametrize("settings,bits", [(dict(weight_scheme="symmetric"), [2, 3]),
                                           (dict(weight_range="ternary", weight_bits=2), [2]),
                                           (dict(weight_range="lsq"), [2, 3])])
def test_sensitivity_is_measured_on_the_runs_grid(rng, settings, bits):
    """Each weight is measured on the grid the run trains: its loss increase is that of the weight on that grid
    (NumPy for symmetric and ternary; LSQ at its initial steps), not on the min/max grid."""
    graph, loss, feed, (w1, w2, x, labels) = _toy(rng)
    config = tfquant.QuantConfig(quantize_all_layers=True, **settings)
    grid = weight_grids.for_config(config)
    with graph.as_default():
        weights, _ = sensitivity.find_targets(graph, config)
        init = tf1.global_variables_initializer()
    with new_session(graph) as sess:
        sess.run(init)
        measured = sensitivity.measure(sess, loss, [feed], weights, {sensitivity.WEIGHT: bits})
    base = _np_loss(w1, w2, x, labels)
    for name, value in (("w1", w1), ("w2", w2)):
        for width in bits:
            if grid.name == "symmetric":
                on_grid = _symmetric_np(value, width)
            elif grid.name == "ternary":
                signed, scale = _ternary_np(value, "none")
                on_grid = signed * scale
            else:
                with tf.Graph().as_default(), tf1.Session() as sess:
                    on_grid = sess.run(grid.initial_widths(tf.constant(value), [width], ops.GroupLayout())[width])
                    step = sess.run(weight_grids.lsq_weight_initial(tf.constant(value), width, ops.GroupLayout()))
                # LSQ's grid at its initial step: signed codes -2^(k-1) .. 2^(k-1)-1 times the step.
                np.testing.assert_allclose(on_grid, np.clip(np.round(value / step), -2 ** (width - 1),
                                                            2 ** (width - 1) - 1) * step, rtol=1e-5, atol=1e-7)
            with tf.Graph().as_default(), tf1.Session() as sess:
                min_max = sess.run(ops.quantize_weight(tf.constant(value), width))
            assert np.abs(min_max - on_grid).max() > 1e-3  # the grids disagree on this weight
            quantized = {"w1": (on_grid, w2), "w2": (w1, on_grid)}[name]
            expected = _np_loss(*quantized, x, labels) - base
            assert measured[name][width] == pytest.approx(expected, rel=1e-3, abs=1e-5), (name, width)
