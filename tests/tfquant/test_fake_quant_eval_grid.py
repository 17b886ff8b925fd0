"""The FakeQuant ops of the export graph quantize on the evaluation graph's grid bit for bit (issue 32).

The evaluation graph's activation quantizer (ops.quantize_zero_exact) is run by a TensorFlow session, whose
grappler turns the step's division by 2^k - 1 into a product with float32(1 / (2^k - 1)). A FakeQuant given the
trained [min, max] divides, an ulp off for many ranges, which moved codes at rounding boundaries and the int32
bias grid of the next layer. fake_quant_graph.on_eval_grid gives the FakeQuant the nudged grid itself.
"""
import numpy as np
import tensorflow as tf

from tests.conftest import new_session
from tfquant import ops
from tfquant.export import fake_quant_graph

tf1 = tf.compat.v1
RANGES = [(0.0, 6.0234), (0.0, 3.0266163), (-1.7340515, 9.517345), (-0.37, 0.51), (0.0, 0.00317),
          (-12.5, 4.75), (-3.1, 0.0)] + [
    (float(lo), float(hi)) for lo, hi in zip(np.random.default_rng(3).uniform(-8, 0, 40).astype(np.float32),
                                             np.random.default_rng(4).uniform(0.01, 16, 40).astype(np.float32))]


def _session_values(ranges, values):
    """[(step, the division it replaces, quantize_zero_exact values, FakeQuant values, FakeQuant range)] of the
    ranges on_eval_grid places (None for one it cannot), run in one session."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None])
        low, high = tf1.placeholder(tf.float32, []), tf1.placeholder(tf.float32, [])
        step = ops.zero_exact_step(8, low, high)
        division = (tf.maximum(tf.maximum(high, 0.0), tf.minimum(low, 0.0) + ops.RANGE_EPS)
                    - tf.minimum(low, 0.0)) / 255.0
        trained = ops.quantize_zero_exact(x, 8, low, high)
        results = []
        with new_session(graph) as sess:
            for lo, hi in ranges:
                grid = fake_quant_graph.on_eval_grid(lo, hi, 8)
                if grid is None:
                    results.append(None)
                    continue
                fake = tf.quantization.fake_quant_with_min_max_vars(x, grid[0], grid[1], num_bits=8)
                # Values over the range and a little past both ends (clipped).
                feed = np.float32(min(lo, 0.0) - 0.05 * (hi - lo)) + values * np.float32(1.1 * (hi - min(lo, 0.0)))
                results.append(sess.run([step, division, trained, fake], {x: feed, low: lo, high: hi}) + [grid])
    return results


def test_fake_quant_on_eval_grid_is_the_eval_quantizer_bit_for_bit():
    values = np.random.default_rng(0).uniform(0, 1, 20000).astype(np.float32)
    exact = 0
    for (lo, hi), result in zip(RANGES, _session_values(RANGES, values)):
        if result is None:
            continue
        step, division, trained, fake, grid = result
        # The session's division is the product written out (grappler's rewrite), so training is unchanged.
        assert step == division, (lo, hi)
        # tf2onnx's scale (float64 quotient of the FakeQuant's range, as float32) and zero point are the step's.
        scale = np.float32((grid[1] - grid[0]) / 255)
        assert scale == step, (lo, hi)
        assert -np.around(grid[0] / float(scale)) == np.floor(-np.float32(min(lo, 0.0)) / step + np.float32(0.5))
        if np.float32(np.float32(np.float32(grid[1]) - np.float32(grid[0])) / np.float32(255)) == step:
            # TensorFlow's kernel derives the step too: the codes are the evaluation graph's but for a value whose
            # scaled position is within an ulp of a half step (the kernel's own float32 rounding of v / step + 0.5).
            codes = np.round((fake.astype(np.float64) - grid[0]) / float(step))
            steps = np.abs(codes - np.round((trained.astype(np.float64) - grid[0]) / float(step)))
            assert steps.max() <= 1 and np.mean(steps) <= 2e-4, (lo, hi, np.mean(steps))
            assert len(np.unique(codes)) > 200
            exact += 1
    assert exact >= 0.8 * len(RANGES)


def test_trained_range_as_given_is_an_ulp_off_for_some_ranges():
    """Why on_eval_grid exists: a FakeQuant of the plain [min, max] leaves the evaluation grid for some ranges."""
    off = 0
    for lo, hi in RANGES:
        lo32, hi32 = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
        quotient = np.float32(np.float32(hi32 - lo32) / np.float32(255))
        product = np.float32(np.float32(hi32 - lo32) * np.float32(1 / 255.0))
        off += quotient != product
    assert off > 5
