"""Sensitivities above the narrowest widths estimated to first order: g.(Q_b(x)-x) against central finite differences
of the loss along Q_b(x)-x, and measure(measured_widths) giving loss runs at the narrowest widths only."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tfquant import sensitivity
from tests.conftest import new_session

tf1 = tf.compat.v1
WIDTHS = {sensitivity.WEIGHT: [2, 3, 4, 6, 8], sensitivity.ACTIVATION: [2, 3, 4, 8]}


@pytest.fixture(scope="module")
def convnet():
    """conv 3->6, two 6->6 convs with a skip, pooled, dense to 3; 8 examples; its targets, restored session."""
    rng = np.random.default_rng(7)
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [8, 6, 6, 3])
        labels = tf1.placeholder(tf.int64, [8])
        shapes = [(3, 3, 3, 6), (3, 3, 6, 6), (3, 3, 6, 6)]
        kernels = [tf1.get_variable("conv%d" % i, initializer=rng.normal(0, 0.4, s).astype(np.float32))
                   for i, s in enumerate(shapes)]
        h = skip = tf.nn.relu(tf.nn.conv2d(images, kernels[0], 1, "SAME"), name="relu0")
        for i in (1, 2):
            h = tf.nn.relu(tf.nn.conv2d(h, kernels[i], 1, "SAME"), name="relu%d" % i)
        dense = tf1.get_variable("dense", initializer=rng.normal(0, 1.0, (6, 3)).astype(np.float32))
        logits = tf.reduce_mean(h + skip, axis=[1, 2]) @ dense
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        init = tf1.global_variables_initializer()
    feeds = [{images: rng.uniform(0, 1, (8, 6, 6, 3)).astype(np.float32), labels: rng.integers(0, 3, 8)}
             for _ in range(2)]
    weights, activations = sensitivity.find_targets(graph, tfquant.QuantConfig(quantize_all_layers=True))
    sess = new_session(graph)
    sess.run(init)
    yield sess, loss, feeds, weights + activations
    sess.close()


def _directional_derivative(sess, loss, feeds, target, step, epsilon=1e-3):
    """Mean over feeds of (L(x + e*step) - L(x - e*step)) / 2e with x the target's float value: no gradient op."""
    total = 0.0
    for feed in feeds:
        value = sess.run(target.tensors[0], feed)
        losses = []
        for sign in (1, -1):
            fed = dict(feed)
            fed.update({tensor: value + sign * epsilon * step(value) for tensor in target.tensors})
            losses.append(float(sess.run(loss, fed)))
        total += (losses[0] - losses[1]) / (2 * epsilon)
    return total / len(feeds)


def test_first_order_estimate_is_the_directional_derivative_along_the_quantization_error(convnet):
    sess, loss, feeds, targets = convnet
    quantizers = sensitivity._Quantizers(sess.graph, targets, WIDTHS)
    weights = [t for t in targets if t.kind == sensitivity.WEIGHT]
    values = dict(zip([t.name for t in weights], sess.run([t.tensors[0] for t in weights])))
    quantized = quantizers.run(sess, [(t, values[t.name]) for t in weights])
    estimated = sensitivity.first_order_increase(sess, loss, feeds, targets, quantizers, values, quantized)
    checked = 0
    for target in targets:
        for bits in (2, 8):
            def step(value, target=target, bits=bits):
                # The quantization error of this value at this width, computed by the same quantizer ops.
                return quantizers.run(sess, [(target, value)])[target.name][bits] - value
            reference = _directional_derivative(sess, loss, feeds, target, step)
            assert estimated[target.name][bits] == pytest.approx(reference, rel=2e-2, abs=2e-4), (target.name, bits)
            checked += abs(reference) > 1e-3
    assert checked >= len(targets)  # most comparisons are of clearly non-zero slopes


def test_measure_runs_the_loss_at_the_narrowest_widths_and_estimates_the_rest(convnet):
    sess, loss, feeds, targets = convnet
    full = sensitivity.measure(sess, loss, feeds, targets, WIDTHS)
    counts = {sensitivity.WEIGHT: 2, sensitivity.ACTIVATION: 1}
    mixed = sensitivity.measure(sess, loss, feeds, targets, WIDTHS, counts)
    quantizers = sensitivity._Quantizers(sess.graph, targets, WIDTHS)
    weights = [t for t in targets if t.kind == sensitivity.WEIGHT]
    values = dict(zip([t.name for t in weights], sess.run([t.tensors[0] for t in weights])))
    first = sensitivity.first_order_increase(sess, loss, feeds, targets, quantizers, values,
                                             quantizers.run(sess, [(t, values[t.name]) for t in weights]))
    for target in targets:
        narrowest = WIDTHS[target.kind][:counts[target.kind]]
        assert sorted(mixed[target.name]) == WIDTHS[target.kind]
        for bits in WIDTHS[target.kind]:
            expected = full[target.name][bits] if bits in narrowest else first[target.name][bits]
            assert mixed[target.name][bits] == pytest.approx(expected, rel=1e-6, abs=1e-9), (target.name, bits)
    # The estimate is not the measurement: at 2 bits the loss is far from linear in the error.
    assert any(abs(first[t.name][2] - full[t.name][2]) > 1e-3 for t in targets)
    # 0 or no entry: every width has its loss run.
    assert sensitivity.measure(sess, loss, feeds, targets, WIDTHS, {sensitivity.WEIGHT: 0}) == full


def test_estimates_come_from_the_float_pass_and_one_quantizing_run_per_activation(convnet):
    """With widths estimated, each batch has one float run (forward and backward: the loss, the values fed back and
    the gradients), one run per activation (its measured widths' values and its estimates) and one loss run per
    target and measured width; the weights are read and quantized once. No second float pass for the gradients,
    no second quantizing run per activation."""
    sess, loss, feeds, targets = convnet
    counts = {sensitivity.WEIGHT: 2, sensitivity.ACTIVATION: 1}
    calls = []
    real_run = sess.run
    sess.run = lambda fetches, feed_dict=None: calls.append(fetches) or real_run(fetches, feed_dict)
    try:
        sensitivity.measure(sess, loss, feeds, targets, WIDTHS, counts)
    finally:
        del sess.run
    activations = [t for t in targets if t.kind == sensitivity.ACTIVATION]
    loss_runs = sum(counts[t.kind] for t in targets)
    # The weights' read and two quantizing runs (conv1 and conv2 share one quantizer), then the batches'.
    assert len(calls) == 3 + len(feeds) * (1 + len(activations) + loss_runs)
    assert sum(fetches is loss for fetches in calls) == len(feeds) * loss_runs
    quantizing = [c for c in calls if isinstance(c, dict) and len(c) == 1 and next(iter(c)) in
                  {t.name for t in activations}]
    assert len(quantizing) == len(feeds) * len(activations)
    for run in quantizing:
        (values, estimates), = run.values()
        assert sorted(values) == WIDTHS[sensitivity.ACTIVATION][:1]
        assert sorted(estimates) == WIDTHS[sensitivity.ACTIVATION][1:]


def test_estimates_are_the_same_when_the_float_values_come_in_several_passes(convnet, monkeypatch):
    """With room for one activation's values at a time, each group's float pass fetches its own targets' gradients:
    the estimates (and the measured widths) are those of one pass holding everything."""
    sess, loss, feeds, targets = convnet
    counts = {sensitivity.WEIGHT: 2, sensitivity.ACTIVATION: 1}
    held = sensitivity.measure(sess, loss, feeds, targets, WIDTHS, counts)
    monkeypatch.setattr(sensitivity, "FLOAT_VALUE_BYTES", 4 * 6 * 6 * 6 * 8)
    calls = []
    real_run = sess.run
    sess.run = lambda fetches, feed_dict=None: calls.append(fetches) or real_run(fetches, feed_dict)
    try:
        split = sensitivity.measure(sess, loss, feeds, targets, WIDTHS, counts)
    finally:
        del sess.run
    float_passes = [c for c in calls if isinstance(c, list) and any(
        getattr(f, "name", "").startswith(sensitivity.SCOPE + "/gradients") for f in c)]
    assert len(float_passes) > len(feeds)
    for target in targets:
        for bits in WIDTHS[target.kind]:
            assert split[target.name][bits] == pytest.approx(held[target.name][bits], rel=1e-6, abs=1e-9)
