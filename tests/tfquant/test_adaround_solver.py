"""tfquant.adaround_solver: a layer's output error through its inputs' Gram matrix equals the error TensorFlow's
own op computes, and the in-graph Adam iterations follow a NumPy implementation of AdaRound's loss step by step."""
import math

import numpy as np
import pytest
import tensorflow as tf

from tfquant import adaround, adaround_solver
from tests.conftest import new_session

tf1 = tf.compat.v1


def _conv(strides, padding, dilations=(1, 1), explicit=None, data_format="NHWC"):
    def layer(x, w):
        return tf.nn.conv2d(x, w, strides=strides, padding=explicit if padding == "EXPLICIT" else padding,
                            dilations=list(dilations), data_format=data_format)
    return layer


LAYERS = {
    # name: (input shape, weight shape, weight index, op of (data, weight))
    "conv same stride 2": ((3, 9, 9, 4), (3, 3, 4, 5), 1, _conv([1, 2, 2, 1], "SAME")),
    "conv valid dilated": ((3, 9, 9, 4), (3, 3, 4, 5), 1, _conv([1, 1, 1, 1], "VALID", (2, 2))),
    "conv explicit 1x2 kernel": ((2, 7, 8, 3), (1, 2, 3, 4), 1,
                                 _conv([1, 1, 2, 1], "EXPLICIT", explicit=[[0, 0], [1, 0], [2, 1], [0, 0]])),
    "depthwise multiplier 2": ((3, 8, 8, 4), (3, 3, 4, 2), 1,
                               lambda x, w: tf.nn.depthwise_conv2d(x, w, [1, 2, 2, 1], "SAME")),
    "matmul": ((6, 7), (7, 5), 1, lambda x, w: tf.matmul(x, w)),
    "matmul transposed a and b": ((7, 6), (5, 7), 1, lambda x, w: tf.matmul(x, w, transpose_a=True,
                                                                            transpose_b=True)),
    "matmul weight first": ((7, 6), (5, 7), 0, lambda x, w: tf.matmul(w, x)),
    "matmul weight first transposed": ((6, 7), (7, 5), 0, lambda x, w: tf.matmul(w, x, transpose_a=True,
                                                                                 transpose_b=True)),
    "batch matmul": ((2, 3, 6, 7), (7, 5), 1, lambda x, w: tf.linalg.matmul(x, w)),
    "batch matmul adjoint weight first": ((2, 7, 6), (7, 5), 0,
                                          lambda x, w: tf.linalg.matmul(w, x, adjoint_a=True)),
}


def _channel_axis(name, output_rank):
    """Where a layer's output channels are: the last axis, or the rows when the weight is the left operand."""
    return output_rank - 2 if "weight first" in name else output_rank - 1


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gram_error_is_the_layers_own_output_error(name, rng):
    input_shape, weight_shape, weight_index, layer = LAYERS[name]
    x = rng.normal(size=input_shape).astype(np.float32)
    difference = rng.normal(size=weight_shape).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        data = tf1.placeholder(tf.float32, input_shape)
        weight = tf1.placeholder(tf.float32, weight_shape)
        output = layer(data, weight)
        view = adaround_solver.linear_view(output.op, weight_index)
        gram_op = adaround_solver.gram(view.rows(data))
        with new_session(graph) as sess:
            # The reference: the op itself applied to the weight difference (it is linear in the weight).
            out, (gram_sum, rows) = sess.run([output, gram_op], feed_dict={data: x, weight: difference})
    axis = _channel_axis(name, out.ndim)
    expected = np.sum(out.astype(np.float64) ** 2) / (out.size / out.shape[axis])
    matrix = view.to_matrix(difference).astype(np.float64)
    got = np.sum(matrix * np.matmul(gram_sum.astype(np.float64), matrix)) / rows
    assert got == pytest.approx(expected, rel=1e-4)
    np.testing.assert_array_equal(view.from_matrix(view.to_matrix(difference), weight_shape), difference)


def test_gram_over_a_subset_of_rows(rng):
    rows = rng.normal(size=(2, 1000, 3)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default(), new_session(graph) as sess:
        (full, count), (part, kept) = sess.run([adaround_solver.gram(rows), adaround_solver.gram(rows, 300, seed=1)])
    assert count == 1000 and 200 < kept < 400
    np.testing.assert_allclose(full, np.einsum("bmk,bml->bkl", rows.astype(np.float64), rows), rtol=1e-4)
    # The subset's Gram matrix is that of some kept rows, the same ones for every b: the diagonal sums of squares.
    assert np.all(part[:, range(3), range(3)] < full[:, range(3), range(3)])
    graph = tf.Graph()
    with graph.as_default(), new_session(graph) as sess:
        _, every = sess.run(adaround_solver.gram(rows, 5000))
    assert every == 1000


CONV_LAYERS = {**{name: LAYERS[name] for name in LAYERS if "conv" in name},
               # an odd size with stride 2 (SAME pads one more row after than before), and a 1x1 kernel
               "conv same odd stride 2": ((2, 11, 10, 3), (3, 3, 3, 4), 1, _conv([1, 2, 2, 1], "SAME")),
               "conv 1x1 stride 2": ((2, 7, 7, 3), (1, 1, 3, 4), 1, _conv([1, 2, 2, 1], "VALID")),
               "depthwise dilated": ((2, 9, 9, 3), (3, 3, 3, 1), 1,
                                     lambda x, w: tf.raw_ops.DepthwiseConv2dNative(
                                         input=x, filter=w, strides=[1, 1, 1, 1], padding="SAME",
                                         dilations=[1, 2, 2, 1]))}


@pytest.mark.parametrize("name", sorted(CONV_LAYERS))
@pytest.mark.parametrize("max_rows", [12, 10 ** 6])
def test_conv_rows_sampled_alone_are_those_the_gram_keeps_of_all_patches(name, max_rows, rng):
    input_shape, weight_shape, weight_index, layer = CONV_LAYERS[name]
    x = rng.normal(size=input_shape).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        data = tf1.placeholder(tf.float32, [None] + list(input_shape[1:]))
        output = layer(data, tf.zeros(weight_shape))
        view = adaround_solver.linear_view(output.op, weight_index)
        sampled = adaround_solver.view_gram(view, data, max_rows, seed=3)
        # The kept rows alone: no op extracts every patch.
        assert not [op for op in graph.get_operations() if op.type == "ExtractImagePatches"]
        with new_session(graph) as sess:
            (expected, expected_rows), (got, got_rows), all_rows = sess.run(
                [adaround_solver.gram(view.rows(data), max_rows, seed=3), sampled, view.rows(data)],
                feed_dict={data: x})
    assert got_rows == expected_rows and (expected_rows < all_rows.shape[1] if max_rows == 12
                                          else expected_rows == all_rows.shape[1])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def numpy_gradient(gram_matrix, start, step, movable, v, beta, on, options):
    """d loss / dV of AdaRound's loss, written out in float64 NumPy."""
    sig = 1.0 / (1.0 + np.exp(-v))
    stretched = sig * (adaround_solver.ZETA - adaround_solver.GAMMA) + adaround_solver.GAMMA
    h = np.clip(stretched, 0.0, 1.0)
    dloss_dh = 2.0 * np.matmul(gram_matrix, start + step * h) * step
    if on:
        a = 2.0 * h - 1.0
        dloss_dh += options.reg_weight * movable * (-beta * np.abs(a) ** (beta - 1.0) * np.sign(a) * 2.0)
    return dloss_dh * sig * (1.0 - sig) * (adaround_solver.ZETA - adaround_solver.GAMMA) * (
        (stretched > 0) & (stretched < 1))


def numpy_adaround(gram_matrix, start, step, movable, logits, options):
    """AdaRound's Adam iterations in float64 NumPy: the reference for the in-graph loop."""
    v = logits.astype(np.float64)
    m, s = np.zeros_like(v), np.zeros_like(v)
    for t in range(options.iterations):
        beta, on = adaround.annealed_beta(t, options)
        grad = numpy_gradient(gram_matrix, start, step, movable, v, beta, on, options)
        m = 0.9 * m + 0.1 * grad
        s = 0.999 * s + 0.001 * grad ** 2
        rate = options.learning_rate * math.sqrt(1 - 0.999 ** (t + 1)) / (1 - 0.9 ** (t + 1))
        v = v - rate * m / (np.sqrt(s) + 1e-8)
    return v


def numpy_loss(gram_matrix, start, step, movable, v, beta, options):
    sig = 1.0 / (1.0 + np.exp(-v))
    h = np.clip(sig * (adaround_solver.ZETA - adaround_solver.GAMMA) + adaround_solver.GAMMA, 0.0, 1.0)
    d = start + step * h
    return (np.sum(d * np.matmul(gram_matrix, d))
            + options.reg_weight * np.sum(movable * (1.0 - np.abs(2.0 * h - 1.0) ** beta)))


def test_in_graph_iterations_follow_numpy(rng):
    x = rng.normal(size=(2, 50, 6))
    gram_matrix = np.einsum("bmk,bml->bkl", x, x) / 50
    start = rng.normal(0, 0.1, size=(2, 6, 3))
    step = np.full((2, 6, 3), 0.2)
    movable = (rng.uniform(size=(2, 6, 3)) > 0.2).astype(np.float64)
    step *= movable
    logits = rng.normal(size=(2, 6, 3))
    options = adaround.AdaRoundOptions(iterations=40, learning_rate=0.05, reg_weight=0.05)
    # The reference's gradient is its loss's derivative (central differences, where the clip is not active).
    beta, v = 8.0, rng.normal(0, 0.5, size=(2, 6, 3))
    analytic = numpy_gradient(gram_matrix, start, step, movable, v, beta, True, options)
    for index in [(0, 1, 2), (1, 3, 0), (1, 5, 2), (0, 0, 0)]:
        eps = np.zeros_like(v)
        eps[index] = 1e-6
        numeric = (numpy_loss(gram_matrix, start, step, movable, v + eps, beta, options)
                   - numpy_loss(gram_matrix, start, step, movable, v - eps, beta, options)) / 2e-6
        assert analytic[index] == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    expected = numpy_adaround(gram_matrix, start, step, movable, logits, options)
    graph = tf.Graph()
    with graph.as_default():
        solver = adaround_solver.build_solver(options)
    with new_session(graph) as sess:
        got = solver.run(sess, *(a.astype(np.float32) for a in (gram_matrix, start, step, movable, logits)),
                         options.iterations)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert np.abs(got - logits).max() > 0.5  # it did move


def test_in_graph_annealing_is_the_schedule(rng):
    options = adaround.AdaRoundOptions(iterations=37, warm_start=0.3)
    graph = tf.Graph()
    with graph.as_default(), new_session(graph) as sess:
        steps = tf1.placeholder(tf.float32, [None])
        schedule = adaround_solver.annealing(steps, 37.0, options)
        beta, on = sess.run(schedule, feed_dict={steps: np.arange(37, dtype=np.float32)})
    expected = [adaround.annealed_beta(t, options) for t in range(37)]
    np.testing.assert_allclose(beta, [b for b, _ in expected], rtol=1e-5)
    np.testing.assert_array_equal(on, [1.0 if r else 0.0 for _, r in expected])


def test_solver_schedule_is_the_annealing_and_adams_step_size_per_iteration():
    options = adaround.AdaRoundOptions(iterations=23, warm_start=0.3, reg_weight=0.05, learning_rate=0.02)
    graph = tf.Graph()
    with graph.as_default():
        solver = adaround_solver.build_solver(options)
    with new_session(graph) as sess:
        weight, slope, exponent, rate = sess.run(solver.schedule, feed_dict={solver.iterations: 23})
    expected = [adaround.annealed_beta(t, options) for t in range(23)]
    beta = np.array([b for b, _ in expected])
    np.testing.assert_allclose(weight, [0.05 if on else 0.0 for _, on in expected], rtol=1e-6)
    np.testing.assert_allclose(slope, -2.0 * beta, rtol=1e-5)
    np.testing.assert_allclose(exponent, beta - 1.0, rtol=1e-5)
    t = np.arange(1, 24)
    # float32 1 - 0.999^t loses digits to cancellation at small t
    np.testing.assert_allclose(rate, 0.02 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t), rtol=1e-4)


def test_batched_weights_of_a_batch_matmul_are_not_expressed():
    with tf.Graph().as_default():
        product = tf.linalg.matmul(tf.zeros([2, 3, 4]), tf.zeros([2, 4, 5]))
        assert adaround_solver.linear_view(product.op, 1) is None


def test_iterations_do_not_depend_on_grappler(rng):
    """The solver's session may run with grappler on or off: the float32 iterations are the same bit for bit (the
    chain groups its constant as grappler's arithmetic optimizer would, so grappler has nothing to reorder)."""
    batch, k, c = 2, 9, 5
    x = rng.normal(size=(batch, 40, k))
    movable = (rng.uniform(size=(batch, k, c)) > 0.15).astype(np.float64)
    step = rng.uniform(0.05, 0.3, size=(batch, k, c)) * movable
    problem = [np.einsum("bmk,bml->bkl", x, x) / 40, -rng.uniform(0, 1, size=(batch, k, c)) * step, step, movable,
               rng.normal(0, 2, size=(batch, k, c))]
    options = adaround.AdaRoundOptions(iterations=60, learning_rate=0.05, reg_weight=0.05)
    results = []
    for grappler in (True, False):
        graph = tf.Graph()
        with graph.as_default():
            solver = adaround_solver.build_solver(options)
        config = tf1.ConfigProto()
        config.graph_options.rewrite_options.disable_meta_optimizer = not grappler
        with tf1.Session(graph=graph, config=config) as sess:
            results.append(solver.run(sess, *(a.astype(np.float32) for a in problem), options.iterations))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], numpy_adaround(*problem, options), rtol=2e-3, atol=2e-3)
