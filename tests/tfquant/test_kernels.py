"""The fused activation kernels (tfquant.kernels) against the op chain they replace and a NumPy reference.

Bit for bit: min/max against tf.reduce_min/max (empty tensors, NaN, infinities, signed zeros), the quantizer
against ops.quantize_in_range run by TensorFlow and against NumPy float32 arithmetic, on tensors of several
shapes (1 element, odd sizes, large ones sharded over both threads), ties at .5 after scaling, constant
tensors and +0.0 / -0.0 minima; a training graph with the kernels against the same graph on the op chain
(outputs, gradients, moving averages after a few steps); and the fallback when the library is off, missing,
stale or broken.
"""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tfquant import kernels, ops, ranges
from tfquant.kernels import build

tf1 = tf.compat.v1
BITS = (1, 2, 4, 8, 16)


@pytest.fixture(scope="module", autouse=True)
def library():
    """The package's library, built here when tools/setup_env.sh has not (skipped without a compiler)."""
    if not build.is_current() and shutil.which(os.environ.get("CXX", "g++").split()[0]) is None:
        pytest.skip("no C++ compiler to build tfquant's activation kernels")
    ok, message = build.build()
    assert ok, message
    assert kernels.status() == (True, os.path.join(kernels.LIBRARY_DIR, kernels.LIBRARY_NAME))


def numpy_quantized(x, bits, lo, hi):
    """The op chain's arithmetic step by step in float32 (np.rint rounds half to even, as tf.round)."""
    x, lo, hi = np.asarray(x, np.float32), np.float32(lo), np.float32(hi)
    levels = np.float32(2 ** bits - 1)
    with np.errstate(invalid="ignore", over="ignore"):
        width = hi - lo
        alpha = (width if np.isnan(width) else np.maximum(width, np.float32(0.0))) + np.float32(1e-10)
        codes = np.rint((x - lo) * (levels / alpha))
        return codes * (alpha * np.float32(1.0 / (2 ** bits - 1))) + lo


def same_bits(got, want):
    """Equal bit for bit, except that any NaN equals any NaN (payloads are the hardware's)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    keep = ~np.isnan(want)
    np.testing.assert_array_equal(got[keep].view(np.int32), want[keep].view(np.int32))


def tensors(rng):
    """(name, float32 array) cases: shapes, ReLU outputs with either zero, ties, constants, special values."""
    relu = np.maximum(rng.normal(size=(4, 9, 9, 5)), 0.0).astype(np.float32)
    negative_zero_relu = np.where(relu == 0, np.float32(-0.0), relu)
    # Codes k/2 on a 4-bit grid from 0 to 15: alpha = 15 (the 1e-10 vanishes), scale 1, every odd k a tie.
    ties = (rng.integers(0, 31, size=(3, 333)) / 2.0).astype(np.float32)
    ties.flat[:2] = (0.0, 15.0)
    large = rng.normal(size=(128, 28, 28, 16)).astype(np.float32)
    large.flat[-1] = -7.5  # the extremes in the last shard
    large.flat[-2] = 9.25
    return [("normal", rng.normal(size=(7, 11)).astype(np.float32)),
            ("one element", np.array([3.25], np.float32)),
            ("one negative element", np.array([[-0.75]], np.float32)),
            ("odd size", (rng.normal(size=(3, 100003)) * 40).astype(np.float32)),
            ("relu +0 minimum", relu), ("relu -0 minimum", negative_zero_relu),
            ("ties", ties), ("constant", np.full((5, 6), 2.5, np.float32)),
            ("constant zero", np.zeros((2, 3), np.float32)), ("negative zeros", np.full((4,), -0.0, np.float32)),
            ("shifted positive", np.abs(rng.normal(size=(6, 6))).astype(np.float32) + np.float32(0.25)),
            ("large sharded", large)]


def special_tensors():
    return [("empty", np.zeros((0, 3), np.float32)),
            ("nan", np.array([1.0, np.nan, -2.0], np.float32)),
            ("nan last", np.r_[np.ones(70000, np.float32), np.float32(np.nan)]),
            ("infinity", np.array([1.0, np.inf, -2.0], np.float32)),
            ("both infinities", np.array([-np.inf, 0.5, np.inf], np.float32))]


@pytest.fixture(scope="module")
def chains():
    """A graph with both paths for every width: (graph, x, kernel range, chain range, {bits: (kernel, chains)})."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, None)
        lo, hi = kernels.min_max(x)
        reduced = (tf.reduce_min(x), tf.reduce_max(x))
        paths = {bits: (kernels.quantize_in_range(x, bits, lo, hi),
                        ops.quantize_in_range(x, bits, reduced[0], reduced[1], skip_plus_zero=True),
                        ops.quantize_in_range(x, bits, reduced[0], reduced[1]))
                 for bits in BITS}
    return graph, x, (lo, hi), reduced, paths


def test_min_max_is_tf_reductions_and_numpy(rng, chains):
    graph, x, fused, reduced, _ = chains
    with new_session(graph) as sess:
        for name, values in tensors(rng) + special_tensors():
            got, want = sess.run([fused, reduced], {x: values})
            for got_value, want_value in zip(got, want):
                same_bits(got_value, want_value)
            if values.size:
                with np.errstate(invalid="ignore"):
                    same_bits(got, [np.min(values), np.max(values)])
            else:
                same_bits(got, [np.inf, -np.inf])
            assert name


def test_min_max_of_both_zeros_is_minus_then_plus_zero(chains):
    graph, x, fused, reduced, _ = chains
    with new_session(graph) as sess:
        for values in ([0.0, -0.0], [-0.0, 0.0], np.r_[np.zeros(50000), -0.0, np.zeros(50000)]):
            lo, hi = sess.run(fused, {x: np.asarray(values, np.float32)})
            assert lo == 0 and hi == 0 and np.signbit(lo) and not np.signbit(hi)


@pytest.mark.parametrize("threads", [1, 2])
def test_quantizer_is_the_op_chain_and_numpy_bit_for_bit(rng, chains, threads):
    graph, x, _, reduced, paths = chains
    config = tf1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1)
    with tf1.Session(graph=graph, config=config) as sess:
        for name, values in tensors(rng) + special_tensors():
            got, range_ = sess.run([paths, reduced], {x: values})
            for bits, (fused, skipping_chain, chain) in got.items():
                same_bits(fused, skipping_chain)
                same_bits(fused, chain)
                same_bits(fused, numpy_quantized(values, bits, *range_))
                assert name and bits


def test_quantizer_with_a_given_range_either_zero(rng):
    """Ranges that are not the tensor's own (codes out of the grid, a -0.0 minimum with both zeros in x)."""
    values = np.r_[np.float32(-0.0), np.float32(0.0), rng.normal(size=500).astype(np.float32)]
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, None)
        lo, hi = tf1.placeholder(tf.float32, []), tf1.placeholder(tf.float32, [])
        fused = kernels.quantize_in_range(x, 4, lo, hi)
        chain = ops.quantize_in_range(x, 4, lo, hi, skip_plus_zero=True)
    with new_session(graph) as sess:
        for minimum, maximum in ((-0.0, 1.0), (0.0, 1.0), (-0.5, 0.5), (1.0, -1.0), (0.0, -0.0)):
            feed = {x: values, lo: minimum, hi: maximum}
            got, want = sess.run([fused, chain], feed)
            same_bits(got, want)
            same_bits(got, numpy_quantized(values, 4, minimum, maximum))


def _conv_net(images):
    x = images
    for index, channels in enumerate((8, 8, 4)):
        kernel = tf1.get_variable("w%d" % index, [3, 3, int(x.shape[-1]), channels],
                                  initializer=tf1.glorot_uniform_initializer(seed=index))
        x = tf.nn.relu(tf.nn.conv2d(x, kernel, [1, 1, 1, 1], "SAME"))
        if index == 1:
            x = tf.nn.elu(x)  # a signed activation: its minimum is negative, nothing skipped
    return tf.reduce_mean(x, axis=[1, 2])


def _train(images, act_range):
    """Outputs, gradients and range variables after 3 momentum steps of a quantized training graph."""
    graph = tf.Graph()
    with graph.as_default():
        logits = _conv_net(tf.constant(images))
        config = tfquant.QuantConfig(weight_bits=4, activation_bits=4, act_range=act_range,
                                     quantize_all_layers=True)
        report = tfquant.quantize_graph(graph, config, is_training=True)
        logits = report.output(logits)
        loss = tf.reduce_sum(logits * tf.constant(np.linspace(-1.0, 1.0, 4, dtype=np.float32)))
        variables = tf1.trainable_variables()
        gradients = tf1.gradients(loss, variables)
        step = tf1.train.MomentumOptimizer(0.05, 0.9).apply_gradients(zip(gradients, variables))
        tracked = tf1.get_collection(ranges.RANGE_COLLECTION)
        types = {op.type for op in graph.get_operations()}, report.activation_path
        with new_session(graph) as sess:
            sess.run(tf1.global_variables_initializer())
            history = []
            for _ in range(3):
                history.append(sess.run([logits, gradients]))
                sess.run(step)
            history.append(sess.run([tf1.trainable_variables(), tracked]))
    return types, history


def _assert_same(got, want):
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
    else:
        assert np.asarray(want).dtype == np.asarray(got).dtype
        np.testing.assert_array_equal(np.atleast_1d(got).view(np.uint8), np.atleast_1d(want).view(np.uint8))


@pytest.mark.parametrize("act_range", ["ema", "batch"])
def test_training_graph_with_kernels_is_the_op_chain_bit_for_bit(rng, monkeypatch, act_range):
    images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    fused_types, fused = _train(images, act_range)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    chain_types, chain = _train(images, act_range)
    (fused_types, fused_path), (chain_types, chain_path) = fused_types, chain_types
    assert {kernels.MIN_MAX_TYPE, kernels.QUANTIZE_TYPE} <= fused_types
    assert not {kernels.MIN_MAX_TYPE, kernels.QUANTIZE_TYPE} & chain_types and "Round" in chain_types
    # Four activations (ReLU, ReLU then ELU, ReLU) quantized; the report says which path ran.
    assert fused_path.startswith("activation quantizers: 4 on the fused kernels (/"), fused_path
    assert chain_path == "activation quantizers: op chain (turned off by TFQ_ACTIVATION_KERNELS=0)"
    _assert_same(fused, chain)


def test_the_kernels_have_no_gradient_and_the_quantizer_is_straight_through(rng):
    values = rng.normal(size=(3, 4)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.constant(values)
        lo, hi = kernels.min_max(x)
        assert tf1.gradients(kernels.quantize_in_range(x, 4, lo, hi), [x, lo, hi]) == [None, None, None]
        quantized, _ = ranges.quantize_activation(x, 4, "batch", True, 0.9, "st/act_quant")
        (gradient,) = tf1.gradients(quantized * tf.constant(values), x)
    assert kernels.QUANTIZE_TYPE in {op.type for op in graph.get_operations()}
    with new_session(graph) as sess:
        np.testing.assert_array_equal(sess.run(gradient), values)


def test_evaluation_and_zero_exact_graphs_keep_plain_ops():
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [2, 3])
        ranges.quantize_activation(x, 4, "ema", False, 0.9, "eval/act_quant", "Relu")
        ranges.quantize_activation(x, 4, "batch", False, 0.9, "eval_batch/act_quant", "Relu")
        ranges.quantize_activation(x, 4, "ema", True, 0.9, "zero_exact/act_quant", "Relu", zero_exact=True)
    assert not {op.type for op in graph.get_operations()} & {kernels.MIN_MAX_TYPE, kernels.QUANTIZE_TYPE}


def test_fallback_when_turned_off_missing_stale_or_broken(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.status() == (False, "turned off by TFQ_ACTIVATION_KERNELS=0") and not kernels.available()
    graph = tf.Graph()
    with graph.as_default():
        ranges.quantize_activation(tf1.placeholder(tf.float32, [2, 3]), 4, "ema", True, 0.9, "a/act_quant")
    assert "Round" in {op.type for op in graph.get_operations()}
    monkeypatch.delenv(kernels.ENV_SWITCH)
    missing, stale, broken = (str(tmp_path / name) for name in ("missing", "stale", "broken"))
    for directory in (missing, stale, broken):
        os.makedirs(directory)
    for directory in (stale, broken):
        with open(os.path.join(directory, kernels.LIBRARY_NAME), "wb") as handle:
            handle.write(b"not a shared library")
    with open(build.stamp_path(stale), "w") as handle:
        handle.write("another source\n")
    with open(build.stamp_path(broken), "w") as handle:
        handle.write(build.expected_stamp())
    assert kernels.status(missing) == (False, "not built (python -m tfquant.kernels.build)")
    assert kernels.status(stale)[1].startswith("built from another source")
    loaded, reason = kernels.status(broken)
    assert not loaded and reason.startswith("failed to load: ")
    with pytest.raises(RuntimeError, match="not available: failed to load"):
        kernels.min_max(tf.constant([1.0]), broken)


def test_a_failed_build_is_one_line_and_leaves_no_library(tmp_path, capsys, monkeypatch):
    source = tmp_path / "broken.cc"
    source.write_text("this is not C++\n")
    ok, message = build.build(str(tmp_path / "out"), source=str(source))
    assert not ok and "failed" in message and "\n" not in message
    assert not os.path.exists(build.library_path(str(tmp_path / "out")))
    monkeypatch.setenv("CXX", "no-such-compiler-tfquant")
    assert build.main(["--output_dir", str(tmp_path / "out"), "--force"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-compiler-tfquant" in err and "op chain" in err
