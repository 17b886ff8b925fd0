"""AdaRound's fused solver step (tfquant/kernels/adaround_step.cc): each kernel against a float32 NumPy reference of
the op chain's arithmetic (bit for bit), and the solver on the kernels against the solver on the op chain (bit for bit,
grappler on or off) and against AdaRound's iterations in float64 NumPy."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import new_session
from tests.tfquant.test_adaround_solver import numpy_adaround
from tfquant import adaround, adaround_solver, kernels
from tfquant.adaround_solver import ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, GAMMA, ZETA
from tfquant.kernels import build

tf1 = tf.compat.v1
F = np.float32


@pytest.fixture(scope="module")
def step_kernels():
    """The package's AdaRound step library, built here when tools/setup_env.sh has not (skipped without a compiler)."""
    if not build.is_current(source=build.ADAROUND_SOURCE, name=kernels.ADAROUND_LIBRARY_NAME) and shutil.which(
            os.environ.get("CXX", "g++").split()[0]) is None:
        pytest.skip("no C++ compiler to build tfquant's AdaRound kernels")
    ok, message = build.build(source=build.ADAROUND_SOURCE, name=kernels.ADAROUND_LIBRARY_NAME)
    assert ok, message
    assert kernels.adaround_status() == (True, os.path.join(kernels.LIBRARY_DIR, kernels.ADAROUND_LIBRARY_NAME))
    module = kernels.adaround_step()
    assert module is not None
    return module


def _problem(rng, batch, k, c):
    """A random AdaRound problem (gram [B, K, K], start, step, movable, logits [B, K, C], float32) with frozen weights."""
    x = rng.normal(size=(batch, 3 * k + 5, k))
    gram_matrix = np.einsum("bmk,bml->bkl", x, x) / x.shape[1]
    movable = (rng.uniform(size=(batch, k, c)) > 0.15).astype(np.float64)
    step = rng.uniform(0.05, 0.3, size=(batch, k, c)) * movable
    start = -rng.uniform(0, 1, size=(batch, k, c)) * step + rng.normal(0, 0.01, size=(batch, k, c)) * (1 - movable)
    logits = rng.normal(0, 2, size=(batch, k, c))
    return tuple(a.astype(F) for a in (gram_matrix, start, step, movable, logits))


def _rectified(sig):
    stretched = sig * F(ZETA - GAMMA) + F(GAMMA)
    return stretched, np.maximum(np.minimum(stretched, F(1.0)), F(0.0))


def test_difference_kernel_is_the_op_chains_float32_arithmetic(step_kernels, rng):
    sig = np.concatenate([rng.uniform(0, 1, 997), [0.0, 1.0, 1 / 12, 11 / 12, 0.5]]).astype(F).reshape(1, 2, -1)
    start, step = (rng.normal(size=sig.shape).astype(F) for _ in range(2))
    with tf.Graph().as_default() as graph, new_session(graph) as sess:
        difference, distance = sess.run(step_kernels.tfquant_adaround_difference(
            sig, start, step, scale=ZETA - GAMMA, shift=GAMMA, floor=1e-12))
    _, h = _rectified(sig)
    np.testing.assert_array_equal(difference, start + step * h)
    np.testing.assert_array_equal(distance, np.maximum(np.abs(F(2.0) * h - F(1.0)), F(1e-12)))
    assert distance.min() == F(1e-12)  # h = 0.5 reaches the floor


@pytest.mark.parametrize("regularised", [False, True])
def test_adam_kernel_is_the_op_chains_float32_arithmetic(step_kernels, regularised, rng):
    shape = (2, 13, 7)
    v, product, powered = (rng.normal(0, 3, size=shape).astype(F) for _ in range(3))
    m, s = rng.normal(0, 0.1, size=shape).astype(F), rng.uniform(0, 0.01, size=shape).astype(F)
    movable = (rng.uniform(size=shape) > 0.2).astype(F)
    step = rng.uniform(0.05, 0.3, size=shape).astype(F) * movable
    weight, slope, rate = F(0.01), F(-13.7), F(0.0031)
    with tf.Graph().as_default() as graph, new_session(graph) as sess:
        sig = sess.run(tf.sigmoid(v))  # TensorFlow's own, as the solver feeds it
        got = sess.run(step_kernels.tfquant_adaround_adam(
            v, m, s, sig, product, step, movable, powered, weight, slope, rate, regularised=regularised,
            scale=ZETA - GAMMA, shift=GAMMA, beta1=ADAM_BETA1, one_minus_beta1=1.0 - ADAM_BETA1, beta2=ADAM_BETA2,
            one_minus_beta2=1.0 - ADAM_BETA2, epsilon=ADAM_EPSILON))
    # The op chain's float32 operations in the order the solver's graph runs them (one rounding each).
    stretched, h = _rectified(sig)
    grad = (F(2.0) * product) * step
    if regularised:
        grad = grad + (weight * movable) * ((slope * powered) * np.sign(F(2.0) * h - F(1.0)))
    inside = ((stretched > 0) & (stretched < 1)).astype(F)
    grad = ((grad * sig) * ((F(1.0) - sig) * F(ZETA - GAMMA))) * inside
    m_next = F(ADAM_BETA1) * m + F(1.0 - ADAM_BETA1) * grad
    s_next = F(ADAM_BETA2) * s + F(1.0 - ADAM_BETA2) * (grad * grad)
    v_next = v - (rate * m_next) / (np.sqrt(s_next) + F(ADAM_EPSILON))
    for name, expected, value in zip("vms", (v_next, m_next, s_next), got):
        np.testing.assert_array_equal(value, expected, err_msg=name)
    assert np.sum(inside == 0) > 0 and np.sum(inside == 1) > 0


def _solve(problem, options, module, grappler=True):
    graph = tf.Graph()
    with graph.as_default():
        solver = adaround_solver.build_solver(options, kernels=module)
    config = tf1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = not grappler
    with tf1.Session(graph=graph, config=config) as sess:
        return solver.run(sess, *problem, options.iterations)


@pytest.mark.parametrize("shape", [(1, 36, 8), (3, 9, 5), (2, 7, 3)])
def test_solver_on_the_kernels_gives_the_op_chains_logits_bit_for_bit(step_kernels, shape, rng):
    problem = _problem(rng, *shape)
    options = adaround.AdaRoundOptions(iterations=60, learning_rate=0.05, reg_weight=0.05)
    chain = _solve(problem, options, None)
    # The op chain's own arithmetic does not depend on grappler (the constant is grouped as grappler groups it).
    np.testing.assert_array_equal(_solve(problem, options, None, grappler=False), chain)
    for grappler in (True, False):
        np.testing.assert_array_equal(_solve(problem, options, step_kernels, grappler), chain)
    # And both are AdaRound's iterations (float64 NumPy, independent of either).
    expected = numpy_adaround(*(a.astype(np.float64) for a in problem), options)
    np.testing.assert_allclose(chain, expected, rtol=2e-3, atol=2e-3)
    assert np.abs(chain - problem[-1]).max() > 0.5  # it did move


def test_the_switch_turns_the_kernels_off(step_kernels, monkeypatch):
    monkeypatch.setenv(kernels.ADAROUND_ENV_SWITCH, "0")
    assert kernels.adaround_status() == (False, "turned off by TFQ_ADAROUND_KERNELS=0")
    assert kernels.adaround_step() is None
