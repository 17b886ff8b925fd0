"""Measured sensitivities against a NumPy forward pass, and their ordering when one layer is made sensitive."""
import threading

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tfquant import sensitivity
from tests.conftest import new_session

tf1 = tf.compat.v1


def _np_quantize(x, bits):
    """tfquant's min/max formula in float32, one range for the whole tensor."""
    x = np.asarray(x, np.float32)
    lo, hi = np.float32(x.min()), np.float32(x.max())
    alpha = np.float32(max(hi - lo, 0.0)) + np.float32(1e-10)
    levels = np.float32(2 ** bits - 1)
    codes = np.round((x - lo) * (levels / alpha))
    return codes * (alpha * np.float32(1.0 / (2 ** bits - 1))) + lo


def _np_loss(x, labels, w1, w2, w3, quantize=None):
    quantize = quantize or {}
    q = lambda name, value: quantize[name](value) if name in quantize else value  # noqa: E731
    h1 = q("relu1", np.maximum(x @ q("w1", w1), 0))
    h2 = q("relu2", np.maximum(h1 @ q("w2", w2), 0))
    logits = h2 @ q("w3", w3)
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


@pytest.fixture
def toy(rng):
    """Three dense layers; w2 holds one huge weight on an input that ReLU keeps at zero: harmless in float,
    but min/max quantization then crushes every other weight of w2 onto a few levels."""
    w1 = rng.normal(0, 0.5, (6, 8)).astype(np.float32)
    w1[:, 0] = -1.0  # inputs are positive: hidden unit 0 is always 0 after ReLU
    w2 = rng.normal(0, 0.5, (8, 8)).astype(np.float32)
    w2[0, 3] = 40.0
    w3 = rng.normal(0, 4.0, (8, 4)).astype(np.float32)  # confident logits: a crushed layer costs much
    batches_x = [rng.uniform(0, 1, (32, 6)).astype(np.float32) for _ in range(2)]
    labels = [np.argmax(np.maximum(np.maximum(x @ w1, 0) @ w2, 0) @ w3, axis=1) for x in batches_x]
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None, 6])
        label_ph = tf1.placeholder(tf.int64, [None])
        weights = [tf1.get_variable(name, initializer=value) for name, value in (("w1", w1), ("w2", w2), ("w3", w3))]
        h1 = tf.nn.relu(tf.matmul(images, weights[0]), name="relu1")
        h2 = tf.nn.relu(tf.matmul(h1, weights[1]), name="relu2")
        logits = tf.matmul(h2, weights[2])
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=label_ph, logits=logits))
        init = tf1.global_variables_initializer()
    feeds = [{images: x, label_ph: y} for x, y in zip(batches_x, labels)]
    return graph, loss, init, feeds, (w1, w2, w3), list(zip(batches_x, labels))


def test_targets_follow_first_last_rule(toy):
    graph = toy[0]
    weights, activations = sensitivity.find_targets(graph, tfquant.QuantConfig())
    assert [t.name for t in weights] == ["w2"] and weights[0].size == 64
    assert [(t.name, t.size) for t in activations] == [("relu1", 8), ("relu2", 8)]
    weights, _ = sensitivity.find_targets(graph, tfquant.QuantConfig(quantize_all_layers=True))
    assert [t.name for t in weights] == ["w1", "w2", "w3"]


def test_measured_increase_matches_numpy_and_ranks_the_sensitive_layer_first(toy):
    graph, loss, init, feeds, (w1, w2, w3), batches = toy
    weights, activations = sensitivity.find_targets(graph, tfquant.QuantConfig(quantize_all_layers=True))
    variables_before = None
    with new_session(graph) as sess:
        sess.run(init)
        variables_before = sess.run(tf1.global_variables())
        measured = sensitivity.measure(sess, loss, feeds, weights + activations,
                                       {sensitivity.WEIGHT: [2, 3, 4, 8], sensitivity.ACTIVATION: [2, 4]})
        after = sess.run(tf1.global_variables())
    for before, now in zip(variables_before, after):
        np.testing.assert_array_equal(before, now)  # measuring never changes the model
    for name, widths in (("w1", [2, 3, 4, 8]), ("w2", [2, 3, 4, 8]), ("w3", [2, 3, 4, 8]), ("relu1", [2, 4]),
                         ("relu2", [2, 4])):
        for bits in widths:
            expected = np.mean([_np_loss(x, y, w1, w2, w3, {name: lambda v, b=bits: _np_quantize(v, b)})
                                - _np_loss(x, y, w1, w2, w3) for x, y in batches])
            assert measured[name][bits] == pytest.approx(expected, rel=1e-3, abs=1e-4), (name, bits)
    for bits in (2, 3, 4, 8):
        others = max(measured[name][bits] for name in ("w1", "w3"))
        assert measured["w2"][bits] > others, bits
    for bits in (3, 4):  # where the other layers are well quantized, the crushed layer stands out by far
        assert measured["w2"][bits] > 5 * max(measured[name][bits] for name in ("w1", "w3")), bits


def test_non_increasing_envelope():
    assert sensitivity.non_increasing({2: 1.0, 3: -0.5, 4: 0.2, 8: -0.01}) == {8: 0.0, 4: 0.2, 3: 0.2, 2: 1.0}
    with pytest.raises(ValueError, match="1 <= min <= max <= 16"):
        sensitivity.checked_widths(5, 4)


def test_residual_model_matches_numpy_and_recomputes_below_the_target_only(rng):
    """With a skip connection the runs feed the unquantized branch back (the cut); numbers stay exact."""
    w1, w2, w3 = (rng.normal(0, 0.5, shape).astype(np.float32) for shape in ((6, 8), (8, 8), (8, 4)))
    batches = [(rng.uniform(0, 1, (16, 6)).astype(np.float32), rng.integers(0, 4, 16)) for _ in range(2)]

    def np_loss(x, labels, quantize=None):
        quantize = quantize or {}
        q = lambda name, value: quantize[name](value) if name in quantize else value  # noqa: E731
        h1 = q("relu1", np.maximum(x @ q("w1", w1), 0))
        h2 = q("relu2", np.maximum(h1 @ q("w2", w2), 0)) + h1
        logits = h2 @ q("w3", w3)
        logits = logits - logits.max(axis=1, keepdims=True)
        return float(-(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)))[np.arange(len(labels)),
                                                                                     labels].mean())

    graph = tf.Graph()
    with graph.as_default():
        images, label_ph = tf1.placeholder(tf.float32, [None, 6]), tf1.placeholder(tf.int64, [None])
        variables = [tf1.get_variable(n, initializer=v) for n, v in (("w1", w1), ("w2", w2), ("w3", w3))]
        h1 = tf.nn.relu(tf.matmul(images, variables[0]), name="relu1")
        h2 = tf.nn.relu(tf.matmul(h1, variables[1]), name="relu2") + h1
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=label_ph, logits=tf.matmul(h2, variables[2])))
        weights, activations = sensitivity.find_targets(graph, tfquant.QuantConfig(quantize_all_layers=True))
        # w2's runs recompute w2's matmul onwards; the skip branch h1 (= relu1) is fed, never the replaced weight.
        upstream = tfquant.match.reachable([loss.op], lambda op: [t.op for t in op.inputs])
        cut = sensitivity._cut_tensors(weights[1], upstream,
                                       tfquant.match.reachable([images.op, label_ph.op], tfquant.match.readers))
        assert {t.op.name for t in cut} == {"relu1", "Placeholder_1"}
        with new_session(graph) as sess:
            sess.run(tf1.global_variables_initializer())
            measured = sensitivity.measure(sess, loss, [{images: x, label_ph: y} for x, y in batches],
                                           weights + activations, {sensitivity.WEIGHT: [2, 4],
                                                                   sensitivity.ACTIVATION: [2, 4]})
    for name in ("w1", "w2", "w3", "relu1", "relu2"):
        for bits in (2, 4):
            expected = np.mean([np_loss(x, y, {name: lambda v, b=bits: _np_quantize(v, b)}) - np_loss(x, y)
                                for x, y in batches])
            assert measured[name][bits] == pytest.approx(expected, rel=1e-3, abs=1e-4), (name, bits)


def test_one_run_quantizes_every_width_and_weights_once(toy):
    """Runs per measurement: one read of the weights, one run quantizing every weight at every width (not per
    batch, target or width), and per batch one float run, per activation one run quantizing it at every width
    (one at a time: all of them at every width could exhaust memory on a large model), and one loss run per
    target and width."""
    graph, loss, init, feeds, _, _ = toy
    weights, activations = sensitivity.find_targets(graph, tfquant.QuantConfig(quantize_all_layers=True))
    widths = {sensitivity.WEIGHT: [2, 3, 4, 8], sensitivity.ACTIVATION: [2, 4]}
    with new_session(graph) as sess:
        sess.run(init)
        calls = []
        real_run = sess.run
        sess.run = lambda fetches, feed_dict=None: calls.append(fetches) or real_run(fetches, feed_dict)
        sensitivity.measure(sess, loss, feeds, weights + activations, widths)
    per_batch = 1 + len(activations) + len(weights) * 4 + len(activations) * 2
    assert len(calls) == 1 + 1 + len(feeds) * per_batch
    quantizing = [c for c in calls if isinstance(c, dict)]
    assert [sorted(c) for c in quantizing] == [["w1", "w2", "w3"]] + [["relu1"], ["relu2"]] * len(feeds)
    assert all(sorted(by_bits) == widths[sensitivity.WEIGHT] for by_bits in quantizing[0].values())
    # An activation's run: its values at the widths with loss runs (all here), no first-order estimate.
    assert all(sorted(by_bits) == widths[sensitivity.ACTIVATION] and not estimates
               for c in quantizing[1:] for by_bits, estimates in c.values())


def test_parallel_loss_runs_give_each_target_and_width_its_own_loss(toy, monkeypatch):
    """Loss runs in flight together are matched back to their (target, width): the same values as one run at a
    time, where every target's widths differ."""
    graph, loss, init, feeds, _, _ = toy
    weights, activations = sensitivity.find_targets(graph, tfquant.QuantConfig(quantize_all_layers=True))
    widths = {sensitivity.WEIGHT: [2, 3, 4, 8], sensitivity.ACTIVATION: [2, 3, 4]}
    results = []
    for parallel in (1, 4):
        monkeypatch.setattr(sensitivity, "PARALLEL_RUNS", parallel)
        with new_session(graph) as sess:
            sess.run(init)
            results.append(sensitivity.measure(sess, loss, feeds, weights + activations, widths))
    assert results[0] == results[1]
    values = [value for by_bits in results[0].values() for value in by_bits.values()]
    assert len(values) == 3 * 4 + 2 * 3 and len(set(values)) >= len(values) - 2  # a mix-up would show


def test_loss_runs_stay_queued_while_the_next_activation_is_quantized(toy, monkeypatch):
    """The main thread prepares the next target (here: quantizes relu2) while the previous target's loss runs are
    still queued, instead of waiting for them: relu1's runs are held until relu2's quantizing run starts (they
    would time out waiting if the main thread waited for them first), and the values are as without the hold."""
    graph, loss, init, feeds, _, _ = toy
    weights, activations = sensitivity.find_targets(graph, tfquant.QuantConfig(quantize_all_layers=True))
    relu1, relu2 = [t.tensors[0] for t in activations]
    weight_reads = [tensor for t in weights for tensor in t.tensors]  # fed by weight runs (relu1 may be a cut there)
    widths = {sensitivity.WEIGHT: [2, 4], sensitivity.ACTIVATION: [2, 3]}
    monkeypatch.setattr(sensitivity, "PARALLEL_RUNS", 1)
    monkeypatch.setattr(sensitivity, "PENDING_RUNS", 4, raising=False)
    results, released = [], []
    for hold in (False, True):
        relu2_quantizing = threading.Event()
        with new_session(graph) as sess:
            sess.run(init)
            real_run = sess.run

            def run(fetches, feed_dict=None):
                if isinstance(fetches, dict) and "relu2" in fetches:
                    relu2_quantizing.set()
                elif hold and fetches is loss and relu1 in feed_dict and not any(w in feed_dict for w in weight_reads):
                    released.append(relu2_quantizing.wait(timeout=5))
                return real_run(fetches, feed_dict)

            sess.run = run
            results.append(sensitivity.measure(sess, loss, feeds[:1], weights + activations, widths))
    assert released == [True, True]
    assert results[0] == results[1]


def test_float_values_beyond_the_memory_limit_come_from_another_float_run(toy, monkeypatch):
    """With room for one hidden layer's values (8 units x 32 examples, float32) at a time, the float pass runs
    once per group of targets needing at most that much, and every sensitivity is as with everything held."""
    graph, loss, init, feeds, _, _ = toy
    weights, activations = sensitivity.find_targets(graph, tfquant.QuantConfig(quantize_all_layers=True))
    widths = {sensitivity.WEIGHT: [2, 4], sensitivity.ACTIVATION: [2, 3]}
    hidden = {t.tensors[0].name for t in activations}  # relu1:0, relu2:0: the values fed back or quantized
    limit = 4 * 8 * 32
    results, fetched_per_run = [], []
    for bytes_held in (sensitivity.FLOAT_VALUE_BYTES, limit):
        monkeypatch.setattr(sensitivity, "FLOAT_VALUE_BYTES", bytes_held)
        with new_session(graph) as sess:
            sess.run(init)
            calls = []
            real_run = sess.run
            sess.run = lambda fetches, feed_dict=None: calls.append(fetches) or real_run(fetches, feed_dict)
            results.append(sensitivity.measure(sess, loss, feeds, weights + activations, widths))
        # The float passes: the runs fetching the loss or a hidden value along (not the loss runs, which
        # fetch the loss alone, nor the read of the weights).
        fetched_per_run.append([{f.name for f in c if getattr(f, "name", None) in hidden} for c in calls
                                if isinstance(c, list) and any(getattr(f, "name", None) in hidden | {loss.name}
                                                               for f in c)])
    assert results[0] == results[1]
    assert fetched_per_run[0] == [hidden] * len(feeds)  # one float run per batch holds both
    assert len(fetched_per_run[1]) > len(feeds) and all(len(names) <= 1 for names in fetched_per_run[1])
    assert set().union(*fetched_per_run[1]) == hidden
