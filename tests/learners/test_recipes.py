"""Low-bit recipes (issue 34 item 3): a separate range optimizer without weight decay (one step against a hand
computation of Momentum and Adam), weight decay scaled at <= 2 bits (the loss against NumPy), and oscillation
tracking and freezing (against a NumPy simulation of a toy sequence), and a uniform run with all of them."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from learners import graphs, recipes
from learners.uniform_quant import UniformQuantLearner
from nets import model_template
from tfquant import oscillation, weight_grids
from tfquant.layout import GroupLayout
from tests.learners.test_ptq import settings_in

tf1 = tf.compat.v1
NB_ITERS = 10


@pytest.fixture(scope="module")
def helper():
    return model_template.ModelHelper(batch_size=16, batch_size_eval=100, train_subset=256, eval_subset=100,
                                      nb_epochs_rat=0.25, seed=0)


class DecayEverything(model_template.ModelHelper):
    """A helper that decays every variable it is given (so a range variable handed to it would be decayed)."""

    def calc_loss(self, labels, logits, trainable_vars):
        loss, metrics = super().calc_loss(labels, logits, [])
        if trainable_vars:
            loss = loss + self.loss_w_dcy * tf.add_n([tf.nn.l2_loss(v) for v in trainable_vars])
        return loss, dict(metrics, loss=loss)


def cross_entropy_tensor(graph):
    """The per-example cross-entropy of the model's own loss (not the low-bit decay's copies)."""
    ops = [op for op in graph.get_operations() if op.type == "SparseSoftmaxCrossEntropyWithLogits"
           and "low_bit_weight_decay" not in op.name]
    assert len(ops) == 1
    return ops[0].outputs[0]


LSQ_CONFIG = tfquant.QuantConfig(weight_bits=3, activation_bits=3, weight_range="lsq", act_range="lsq",
                                 use_buckets=True, bucket_type="channel", quantize_all_layers=True)


def test_range_optimizer_one_step_against_hand_computation(helper):
    """Step 2 (step 1 stores the initial steps): weights follow Momentum at the weights' rate, ranges Adam at their
    own rate, and the loss decays every weight but no range (the helper here would decay anything it is given)."""
    decay_all = DecayEverything(batch_size=16, batch_size_eval=100, train_subset=256, eval_subset=100,
                                nb_epochs_rat=0.25, seed=0, loss_w_dcy=1e-3)
    # Oscillation tracking rides along (it changes no variable without a threshold): its codes are checked below.
    chosen = recipes.Recipes(range_optimizer="adam", range_lrn_rate_fn=graphs.cosine_lrn_rate(0.05, NB_ITERS),
                             oscillations=oscillation.OscillationSettings())
    model = graphs.build_graph(decay_all, True, quant_config=LSQ_CONFIG,
                               lrn_rate_fn=graphs.cosine_lrn_rate(0.02, NB_ITERS), momentum=0.9,
                               training_recipes=chosen)
    with model.graph.as_default():
        ranges = recipes.range_variables(model.graph)
        names = {v.op.name for v in ranges}
        weights = [v for v in tf1.trainable_variables() if v.op.name not in names]
        gradients = tf.gradients(model.loss, weights + ranges)
        cross_entropy = tf.reduce_mean(cross_entropy_tensor(model.graph))
    assert len(ranges) == 3 + 2 and all(g is not None for g in gradients)  # 3 weight steps, 2 activation steps
    # Without grappler: its first-run optimization of this graph costs more than the three steps.
    with graphs.new_session(model.graph, optimize_graph=False) as sess:
        sess.run(model.init_op)
        g1 = sess.run([model.train_op, gradients])[1]
        before = sess.run(weights + ranges)
        _, g2, lr, range_lr, loss, ce = sess.run([model.train_op, gradients, model.lrn_rate,
                                                  model.extra["range_lrn_rate"], model.loss, cross_entropy])
        after = sess.run(weights + ranges)
        tracked = model.extra["oscillation"].weights
        codes = sess.run({w.variable.op.name: w.previous_codes for w in tracked.values()})
    n = len(weights)
    # The tracker read the codes of the weights and LSQ steps after the step: NumPy's signed 3-bit grid per channel.
    values = dict(zip([v.op.name for v in weights + ranges], after))
    assert sorted(codes) == list(WEIGHTS)
    for name, got in codes.items():
        step = values[name + "_quant/lsq_step"].astype(np.float32)
        np.testing.assert_array_equal(got, np.round(np.clip(values[name] / step, -4, 3)) + 4)
    np.testing.assert_allclose(lr, 0.02 * 0.5 * (1 + np.cos(np.pi / NB_ITERS)), rtol=1e-6)
    np.testing.assert_allclose(range_lr, 0.05 * 0.5 * (1 + np.cos(np.pi / NB_ITERS)), rtol=1e-6)
    # The decay covers the weights (values before this step) and no range variable.
    np.testing.assert_allclose(loss - ce, 1e-3 * sum(0.5 * np.sum(w ** 2) for w in before[:n]), rtol=1e-4)
    for w0, w1, a, b in zip(before[:n], after[:n], g1[:n], g2[:n]):
        np.testing.assert_allclose(w1, w0 - lr * (0.9 * a + b), rtol=1e-5, atol=1e-7)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for r0, r1, a, b in zip(before[n:], after[n:], g1[n:], g2[n:]):
        assert np.all(a == 0)  # step 1 stored the initial ranges: no gradient reached the variables
        m, v = (1 - beta1) * b, (1 - beta2) * b ** 2
        rate = range_lr * np.sqrt(1 - beta2 ** 2) / (1 - beta1 ** 2)
        np.testing.assert_allclose(r1, r0 - rate * m / (np.sqrt(v) + eps), rtol=1e-4, atol=1e-9)
        assert np.any(r1 != r0)


def test_shared_ranges_are_unchanged(helper):
    """Without the recipe the ranges train with the weights' Momentum optimizer, as before."""
    model = graphs.build_graph(helper, True, quant_config=LSQ_CONFIG,
                               lrn_rate_fn=graphs.cosine_lrn_rate(0.02, NB_ITERS), momentum=0.9,
                               training_recipes=recipes.NO_RECIPES)
    slots = sorted(v.op.name for v in model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)
                   if "lsq_step" in v.op.name and "Momentum" in v.op.name)
    assert len(slots) == 5 and "range_lrn_rate" not in model.extra


def test_low_bit_weight_decay_against_numpy(helper):
    """conv2 at 2 bits gets scale x the decay, conv1 and fc (4 bits) the helper's own: the loss against NumPy."""
    config = tfquant.QuantConfig(weight_bits=4, quantize_all_layers=True,
                                 weight_overrides=[("model/conv2/weights", 2)])
    chosen = recipes.Recipes(low_bit_decay_scale=0.1)
    model = graphs.build_graph(helper, True, quant_config=config, lrn_rate_fn=graphs.cosine_lrn_rate(0.02, NB_ITERS),
                               training_recipes=chosen)
    assert recipes.low_bit_weight_names(model.report) == {"model/conv2/weights"}
    with model.graph.as_default():
        weights = {v.op.name: v for v in tf1.trainable_variables() if v.op.name.endswith("weights")}
        per_example = cross_entropy_tensor(model.graph)
    assert sorted(weights) == ["model/conv1/weights", "model/conv2/weights", "model/fc/weights"]
    with graphs.new_session(model.graph) as sess:
        sess.run(model.init_op)
        values = sess.run(weights)
        loss, ce = sess.run([model.loss, per_example])
    decay = helper.loss_w_dcy * sum((0.1 if name == "model/conv2/weights" else 1.0) * 0.5 * np.sum(w.astype(np.float64) ** 2)
                                    for name, w in values.items())
    np.testing.assert_allclose(loss, np.mean(ce.astype(np.float64)) + decay, rtol=1e-5)
    # conv2's share of the decay is large enough for the scale to show in the loss.
    assert abs(decay - helper.loss_w_dcy * sum(0.5 * np.sum(w ** 2) for w in values.values())) > 1e-3 * decay


def numpy_minmax_codes(x, bits):
    """PocketFlow's min/max codes of one range group, in NumPy."""
    levels = 2.0 ** bits - 1
    alpha = np.float32(x.max() - x.min() + 1e-10)
    return np.round((x - x.min()) * np.float32(levels / alpha)), alpha, x.min()


def simulate(sequence, bits, momentum, threshold):
    """Nagel et al.'s oscillation frequency, code EMA and freezing over latent weights `sequence` [T, n] in NumPy."""
    n = sequence.shape[1]
    previous, last, frequency, ema = None, np.zeros(n), np.zeros(n), np.zeros(n)
    frozen, frozen_codes, pinned = np.zeros(n, bool), np.zeros(n), None
    for x in sequence:
        codes, alpha, beta = numpy_minmax_codes(x, bits)
        if previous is None:
            ema = codes.copy()
        else:
            change = np.sign(codes - previous)
            reversal = (change != 0) & (change == -last)
            frequency = momentum * reversal + (1 - momentum) * frequency
            ema = momentum * codes + (1 - momentum) * ema
            last = np.where(change != 0, change, last)
        previous = codes
        if threshold is not None:
            newly = ~frozen & (frequency > threshold)
            frozen_codes = np.where(newly, np.round(ema), frozen_codes)
            frozen |= newly
            scale = np.float32(alpha * np.float32(1.0 / (2 ** bits - 1)))
            pinned = np.where(frozen, frozen_codes * scale + beta, x)
    return frequency, ema, last, frozen, frozen_codes, pinned


def toy_sequence(steps=40):
    """8 latent weights: two fixed at -1 and 1 (the grid), one flipping every step across a code boundary, one every
    third step, one drifting upward through codes, one constant, two with small noise inside a code."""
    rng = np.random.RandomState(0)
    t = np.arange(steps)
    boundary = -1 + 2.0 / 3 * 0.5  # between codes 0 and 1 of a 2-bit grid on [-1, 1]
    columns = [np.full(steps, -1.0), np.full(steps, 1.0), boundary + 0.05 * (-1.0) ** t,
               boundary + 0.05 * np.where((t // 3) % 2 == 0, 1.0, -1.0), -0.95 + 1.9 * t / steps,
               np.full(steps, 0.2), 0.1 + 0.01 * rng.randn(steps), -0.6 + 0.01 * rng.randn(steps)]
    return np.stack(columns, axis=1).astype(np.float32)


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_oscillation_counts_against_numpy_simulation(threshold):
    bits, momentum = 2, 0.2
    sequence = toy_sequence()
    settings = oscillation.OscillationSettings(momentum=momentum, freeze_threshold=threshold)
    graph = tf.Graph()
    with graph.as_default():
        weight = tf1.get_variable("w", initializer=sequence[0], use_resource=True)
        value = tf1.placeholder(tf.float32, sequence.shape[1:])
        assign = weight.assign(value)
        grid, layout = weight_grids.MinMaxGrid(), GroupLayout()
        tracked = oscillation.WeightOscillation(
            weight, lambda: grid.codes(weight.value(), bits, layout),
            lambda c, a, b: oscillation.decode_codes(c, a, b, bits, layout), settings)
        update = oscillation.OscillationTracker({"w": tracked}).update(tf.no_op())
        statistics = tracked.statistics()
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            for x in sequence:
                sess.run(assign, {value: x})  # the optimizer's step
                sess.run(update)
            state = sess.run([tracked.frequency, tracked.code_ema, tracked.last_direction, tracked.frozen,
                              tracked.frozen_codes, weight, statistics])
            final_codes = sess.run(grid.codes(weight.value(), bits, layout)[0])
    frequency, ema, last, frozen, frozen_codes, pinned = simulate(sequence, bits, momentum, threshold)
    np.testing.assert_allclose(state[0], frequency, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state[1], ema, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state[2], last)
    assert state[6]["oscillating"] == np.sum(frequency > settings.report_threshold)
    assert state[6]["weights"] == 8
    # The every-step flipper oscillates far above the every-third-step one; drift, constants and noise do not.
    assert frequency[2] > 0.9 and 0.1 < frequency[3] < frequency[2] and np.all(frequency[[0, 1, 4, 5, 6, 7]] == 0)
    if threshold is None:
        assert not state[3].any() and np.array_equal(state[5], sequence[-1])
        return
    np.testing.assert_array_equal(state[3], frozen)
    assert frozen.tolist() == [False, False, True, True, False, False, False, False]
    np.testing.assert_array_equal(state[4][frozen], frozen_codes[frozen])
    np.testing.assert_allclose(state[5], pinned, rtol=1e-6)
    # The frozen weights sit on their frozen codes of the grid: the quantizer (and an export) reads those codes.
    np.testing.assert_array_equal(final_codes[frozen], frozen_codes[frozen])
    assert state[6]["frozen"] == 2


WEIGHTS = ("model/conv1/weights", "model/conv2/weights", "model/fc/weights")


@pytest.fixture(scope="module")
def recipes_run(tmp_path_factory):
    """A uniform run at W2A4 with every recipe: Adam on the LSQ activation steps, half decay at 2 bits, freezing."""
    helper = model_template.ModelHelper(batch_size=32, batch_size_eval=100, train_subset=256, eval_subset=100,
                                        nb_epochs_rat=0.25, seed=0)
    directory = str(tmp_path_factory.mktemp("recipes"))
    settings = settings_in(directory, uql_range_optimizer="adam", uql_range_lrn_rate=1e-3,
                           uql_low_bit_weight_decay_scale=0.5, uql_freeze_oscillations=0.005, uql_quant_epochs=1.0,
                           uql_lrn_rate_init=0.05)
    config = tfquant.QuantConfig(weight_bits=2, activation_bits=4, act_range="lsq", use_buckets=True,
                                 bucket_type="channel", quantize_all_layers=True)
    learner = UniformQuantLearner(helper, settings, config)
    return learner, learner.train(), directory


def test_run_reports_recipes_and_exports_frozen_codes_bit_for_bit(recipes_run, tmp_path):
    from tfquant.export import model_export
    learner, results, directory = recipes_run
    with open(os.path.join(directory, "models_uql", "results.json")) as handle:
        written = json.load(handle)
    entry = written["oscillation"]
    saved = tf.train.load_checkpoint(results["quant_checkpoint"])
    sizes = {name: saved.get_tensor(name).size for name in WEIGHTS}
    assert entry["weights"] == sum(sizes.values()) and set(entry["layers"]) == {
        "model/conv1/Conv2D", "model/conv2/Conv2D", "model/fc/MatMul"}
    frozen = {name: saved.get_tensor(name + "_oscillation/frozen") for name in WEIGHTS}
    frequency = {name: saved.get_tensor(name + "_oscillation/frequency") for name in WEIGHTS}
    assert entry["frozen"] == sum(int(f.sum()) for f in frozen.values()) > 0
    assert entry["oscillating"] == sum(int((f > 0.005).sum()) for f in frequency.values())
    assert written["low_bit_weight_decay"]["weights"] == list(WEIGHTS)
    assert written["range_optimizer"]["optimizer"] == "adam" and len(written["range_optimizer"]["variables"]) == 2
    assert learner.config.pact_decay == 0.0
    # The packed file holds the checkpoint's codes, and every frozen weight's code is its frozen code.
    packed = str(tmp_path / "model.tfq")
    model_export.pack_checkpoint(results["quant_checkpoint"], results["report"], packed)
    weights, _ = model_export.load_packed_weights(packed)
    layout = tfquant.GroupLayout("channel", channel_axes=(-1,))
    with tf.Graph().as_default():
        fetches = {name: (tfquant.quantize_weight(tf.constant(saved.get_tensor(name)), 2, layout),
                          weight_grids.MinMaxGrid().codes(tf.constant(saved.get_tensor(name)), 2, layout)[0])
                   for name in WEIGHTS}
        with tf1.Session() as sess:
            trained = sess.run(fetches)
    for name in WEIGHTS:
        np.testing.assert_array_equal(weights[name], trained[name][0])
        codes = trained[name][1]
        np.testing.assert_array_equal(codes[frozen[name]],
                                      saved.get_tensor(name + "_oscillation/frozen_codes")[frozen[name]])
    accuracy, _, _ = learner.evaluate()
    assert accuracy == pytest.approx(results["quant_accuracy"], abs=1e-6)


def test_recipe_flags_are_checked():
    from learners import flags as learner_flags
    from learners.errors import UserError
    learner_flags.define_flags()
    flags = learner_flags.FLAGS
    flags(["prog"])
    for argv, message in (
            (["--uql_range_lrn_rate=0.01"], "has no effect without --uql_range_optimizer"),
            (["--uql_range_optimizer=adam", "--uql_range_lrn_rate=0"], "--uql_range_lrn_rate=0.0 is not valid"),
            (["--uql_range_optimizer=adam", "--uql_act_range=pact", "--uql_pact_decay=1e-4"],
             "trains the clip levels without decay"),
            (["--uql_low_bit_weight_decay_scale=-1"], "expected a number >= 0"),
            (["--uql_freeze_oscillations=1.5"], "expected a frequency in (0, 1)"),
            (["--uql_freeze_oscillations=0"], "expected a frequency in (0, 1)")):
        flags.unparse_flags()
        flags(["prog", "--learner=uniform"] + argv)
        try:
            with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
                learner_flags.validate_flags()
        finally:
            flags.unparse_flags()
    flags(["prog"])


def test_oscillation_with_folding_is_refused():
    from learners.errors import UserError
    chosen = recipes.Recipes(oscillations=oscillation.OscillationSettings())
    with pytest.raises(UserError, match="--uql_fold_batch_norms"):
        recipes.check_recipes(chosen, tfquant.QuantConfig(fold_batch_norms=True), None)
    recipes.check_recipes(chosen, tfquant.QuantConfig(), None)
