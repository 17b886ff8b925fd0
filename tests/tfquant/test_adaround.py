"""tfquant.adaround against NumPy: codes within one step of nearest rounding on the quantizer's own grid, a lower
layer output error than nearest rounding, and weights the unchanged quantizer maps back to the chosen codes."""
import numpy as np
import pytest
import tensorflow as tf

from tfquant import adaround, adaround_solver, ops, weight_grids
from tfquant.layout import GroupLayout
from tests.conftest import new_session

tf1 = tf.compat.v1
# The WeightGrid AdaRound is given for each grid the NumPy reference below knows by its scheme's name.
GRIDS = {"asymmetric": weight_grids.MinMaxGrid(), "symmetric": weight_grids.SymmetricGrid()}


def numpy_grid(w, bits, layout, scheme):
    """(nearest codes, per-element step, per-element offset, max code) by the documented formulas, in NumPy."""
    groups = adaround.group_index(w.shape, layout)
    count = groups.max() + 1
    flat_w, flat_g = w.ravel().astype(np.float64), groups.ravel()
    step, offset = np.zeros(count), np.zeros(count)
    levels = 2 ** bits - 1
    for g in range(count):
        values = flat_w[flat_g == g]
        if scheme == "symmetric":
            q = 2 ** (bits - 1) - 1
            step[g] = np.abs(values).max() / q
            offset[g] = -q * step[g]
        else:
            step[g] = (values.max() - values.min()) / levels
            offset[g] = values.min()
    step_e, offset_e = step[groups], offset[groups]
    max_code = levels - (1 if scheme == "symmetric" else 0)
    nearest = np.clip(np.round((w - offset_e) / step_e), 0, max_code).astype(np.int64)
    return nearest, step_e, offset_e, max_code


def solve(node_fn, weight_shape, inputs, bits, layout, scheme, options, rng):
    """Build a one-op layer, run AdaRound on it; returns (w, grid, codes, (nearest, AdaRound) output errors, the
    grid ops and their graph)."""
    w = rng.normal(0, 0.2, weight_shape).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None] + list(inputs.shape[1:]))
        wp = tf1.placeholder(tf.float32, weight_shape)
        op = node_fn(x, wp).op
        codes_op = adaround.grid_codes(wp, bits, layout, GRIDS[scheme])
        view = adaround_solver.linear_view(op, 1)
        gram_op = adaround_solver.gram(view.rows(x))
    with new_session(graph) as sess:
        codes, alpha, beta = sess.run(codes_op, feed_dict={wp: w})
        gram_sum, rows = sess.run(gram_op, feed_dict={x: inputs})
    gram_matrix = gram_sum.astype(np.float64) / rows
    grid = adaround.layer_grid(w, codes, alpha, beta, bits, layout, GRIDS[scheme])
    solver_graph = tf.Graph()
    with solver_graph.as_default():
        solver = adaround_solver.build_solver(options)
    with new_session(solver_graph) as sess:
        chosen = adaround.final_codes(grid, adaround.optimize(sess, solver, view, gram_matrix, w, grid, options))
    errors = (adaround.output_error(view, gram_matrix, w, grid, grid.nearest),
              adaround.output_error(view, gram_matrix, w, grid, chosen))
    return w, grid, chosen, errors, codes_op, graph


def requantize(graph, codes_op, weight):
    with new_session(graph) as sess:
        wp = graph.get_operation_by_name("Placeholder_1").outputs[0]
        return sess.run(codes_op, feed_dict={wp: weight})


OPTIONS = adaround.AdaRoundOptions(iterations=300, seed=0)


@pytest.mark.parametrize("bits,layout,scheme", [
    (3, GroupLayout(), "asymmetric"),
    (4, GroupLayout("channel", channel_axes=(1,)), "asymmetric"),
    (4, GroupLayout("split", bucket_size=20), "asymmetric"),
    (3, GroupLayout("channel", channel_axes=(1,)), "symmetric"),
])
def test_matmul_codes_are_within_one_step_and_lower_the_output_error(bits, layout, scheme, rng):
    # Correlated inputs: the rounding of one weight then matters through the others, as in real layers.
    mixing = rng.normal(size=(24, 24))
    inputs = np.maximum(rng.normal(size=(256, 24)) @ mixing, 0).astype(np.float32)
    w, grid, codes, errors, codes_op, graph = solve(lambda x, wp: tf.matmul(x, wp), (24, 10), inputs, bits,
                                                     layout, scheme, OPTIONS, rng)
    nearest, step, offset, max_code = numpy_grid(w, bits, layout, scheme)
    np.testing.assert_array_equal(grid.nearest, nearest)  # the grid is the quantizer's, as NumPy computes it
    np.testing.assert_allclose(grid.scale, step, rtol=1e-5)
    assert np.abs(codes - nearest).max() <= 1 and codes.min() >= 0 and codes.max() <= max_code
    assert 0 < np.mean(codes != nearest) < 0.5  # it does choose, and mostly agrees with nearest
    # The output error in NumPy, float64, on the calibration inputs.

    def error(c):
        return np.mean(np.sum((inputs.astype(np.float64) @ (w - (c * step + offset))) ** 2, axis=1))

    assert error(codes) < 0.9 * error(nearest)
    assert errors[0] == pytest.approx(error(nearest), rel=1e-3) and errors[1] == pytest.approx(error(codes),
                                                                                               rel=1e-3)
    # The rounded weights quantize back, by the unchanged quantizer, to exactly these codes on the same grid.
    rounded = adaround.rounded_weights(w, grid, codes)
    codes_back, alpha_back, beta_back = requantize(graph, codes_op, rounded)
    codes0, alpha0, beta0 = requantize(graph, codes_op, w)
    np.testing.assert_array_equal(codes_back, codes)
    np.testing.assert_array_equal(alpha_back, alpha0)
    np.testing.assert_array_equal(beta_back, beta0)
    np.testing.assert_array_equal(rounded[codes == nearest], w[codes == nearest])


def test_conv_codes_lower_the_output_error_measured_by_tf_conv2d(rng):
    inputs = np.maximum(rng.normal(size=(64, 8, 8, 6)), 0).astype(np.float32)
    layout = GroupLayout("channel", channel_axes=(3,))

    def conv(x, wp):
        return tf.nn.conv2d(x, wp, [1, 1, 1, 1], "SAME")

    w, grid, codes, _, _, _ = solve(conv, (3, 3, 6, 8), inputs, 4, layout, "asymmetric", OPTIONS, rng)
    nearest, step, offset, _ = numpy_grid(w, 4, layout, "asymmetric")
    assert np.abs(codes - nearest).max() <= 1
    with tf.Graph().as_default(), tf1.Session() as sess:
        def error(c):
            diff = tf.nn.conv2d(inputs, (w - (c * step + offset)).astype(np.float32), [1, 1, 1, 1], "SAME")
            return sess.run(tf.reduce_mean(tf.reduce_sum(tf.square(diff), axis=-1)))
        assert error(codes) < 0.9 * error(nearest)


def test_group_extremes_keep_their_codes_and_the_annealing_follows_the_paper(rng):
    w = rng.normal(size=(5, 4)).astype(np.float32)
    layout = GroupLayout("channel", channel_axes=(1,))
    nearest, _, _, _ = numpy_grid(w, 2, layout, "asymmetric")
    graph = tf.Graph()
    with graph.as_default():
        codes_op = adaround.grid_codes(tf.constant(w), 2, layout, GRIDS["asymmetric"])
    with new_session(graph) as sess:
        grid = adaround.layer_grid(w, *sess.run(codes_op), 2, layout, GRIDS["asymmetric"])
    assert grid.frozen.sum() == 8 and grid.frozen[w.argmin(0), range(4)].all() and grid.frozen[w.argmax(0),
                                                                                               range(4)].all()
    # Every weight rounded up: the extremes stay on their nearest codes (so the grid does not move).
    codes = adaround.final_codes(grid, np.ones_like(nearest))
    np.testing.assert_array_equal(codes[grid.frozen], nearest[grid.frozen])
    options = adaround.AdaRoundOptions(iterations=100)
    assert adaround.annealed_beta(0, options) == (20.0, False) and adaround.annealed_beta(19, options)[1] is False
    assert adaround.annealed_beta(20, options) == (20.0, True)
    assert adaround.annealed_beta(100, options)[0] == pytest.approx(2.0)
    np.testing.assert_allclose(ops.levels(2), 3.0)


def test_depthwise_groups_per_input_channel_and_multiplier(rng):
    layout = GroupLayout("channel", channel_axes=(2, 3))
    groups = adaround.group_index((3, 3, 4, 2), layout)
    expected = np.arange(4)[None, None, :, None] * 2 + np.arange(2)[None, None, None, :]
    np.testing.assert_array_equal(groups, np.broadcast_to(expected, (3, 3, 4, 2)))
    np.testing.assert_array_equal(adaround.group_index((10, 3), GroupLayout("split", bucket_size=4)),
                                  np.arange(30).reshape(10, 3) // 4)
    inputs = np.maximum(rng.normal(size=(64, 6, 6, 4)), 0).astype(np.float32)

    def depthwise(x, wp):
        return tf.nn.depthwise_conv2d(x, wp, [1, 1, 1, 1], "SAME")

    w, grid, codes, errors, _, _ = solve(depthwise, (3, 3, 4, 2), inputs, 3, layout, "asymmetric", OPTIONS, rng)
    nearest, _, _, _ = numpy_grid(w, 3, layout, "asymmetric")
    np.testing.assert_array_equal(grid.nearest, nearest)
    assert np.abs(codes - nearest).max() <= 1 and errors[1] < errors[0]


@pytest.mark.parametrize("grid", [weight_grids.LsqGrid(), weight_grids.TernaryGrid(), weight_grids.BinaryGrid(),
                                  "symmetric"])
def test_grids_adaround_cannot_round_on_are_refused(grid):
    # LSQ learns its step, ternary and binary scales are means: no extreme weight fixes the grid; a name is no grid.
    with pytest.raises(ValueError, match="is not valid for AdaRound; expected a WeightGrid of minmax, symmetric"):
        adaround.grid_codes(tf.zeros([4, 3]), 2, GroupLayout(), grid)
