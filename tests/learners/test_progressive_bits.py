"""Progressive bit-widths (--uql_progressive_bits): the phase schedule against a hand computation, the learned step
sizes at every phase start against LSQ's start recomputed in NumPy at the phase's bits, the weights on each phase's
grid, the final checkpoint exported bit for bit on the final grid, a killed run resumed in the right phase, and the
flag's refusals."""
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from learners import graphs, progressive_bits, training
from learners.errors import UserError
from learners.uniform_quant import UniformQuantLearner
from nets import model_template
from tests.learners.test_ptq import settings_in
from tfquant import checkpoints, ops, step_search, weight_grids

tf1 = tf.compat.v1
WEIGHTS = ("model/conv1/weights", "model/conv2/weights", "model/fc/weights")
ACTIVATIONS = ("model/Relu", "model/Relu_1")
WIDTHS = (8, 4, 2)
# 256 training images in batches of 32, 1.5 epochs: 12 steps, phases starting at steps 0, 4 and 8.
PHASE_ENDS = (4, 8, 12)
CONFIG = tfquant.QuantConfig(weight_bits=2, activation_bits=2, weight_range="lsq", act_range="lsq", use_buckets=True,
                             bucket_type="channel", quantize_all_layers=True)


def run_settings(directory, **overrides):
    # The ranges train with their own Momentum at a negligible rate: each phase's steps stay at the start the
    # phase computed, so a checkpoint's steps can be compared with LSQ's start recomputed in NumPy (and the range
    # optimizer's slots are there to be reset).
    values = dict(uql_quant_epochs=1.5, uql_progressive_bits=["8", "4", "2"], uql_weight_bits=2, uql_activation_bits=2,
                  uql_weight_range="lsq", uql_act_range="lsq", uql_range_optimizer="momentum", uql_range_lrn_rate=1e-12,
                  uql_lrn_rate_init=0.05)
    values.update(overrides)
    return settings_in(directory, **values)


def helper_of():
    return model_template.ModelHelper(batch_size=32, batch_size_eval=100, train_subset=256, eval_subset=100,
                                      nb_epochs_rat=0.25, seed=0)


@pytest.fixture(scope="module")
def progressive_run(tmp_path_factory):
    """A W2A2 per-channel LSQ run through 8, 4 and 2 bits, with its three phase-end checkpoints kept."""
    directory = str(tmp_path_factory.mktemp("progressive"))
    learner = UniformQuantLearner(helper_of(), run_settings(directory, save_step=3), CONFIG)
    # Every checkpoint kept (steps 3, 4, 6, 8, 9, 12): the phase ends and a mid-phase one to resume from.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, "prune_checkpoints", lambda *args, **kwargs: None)
        results = learner.train()
    return learner, results, directory


def checkpoint_values(directory, step):
    reader = tf.train.load_checkpoint(os.path.join(directory, "models_uql", "model.ckpt-%d" % step))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def numpy_lsq_start(values, bits):
    """LSQ's start on the signed grid in NumPy: of the starts max|v| / Q_P * 2^(-j/4) (j < 12), 2<|v|>/sqrt(Q_P) and
    the Gaussian-optimal ratio times the RMS, each refined 3 times (codes for the step, least-squares step for the
    codes), the one of least squared error."""
    v = values.astype(np.float32).ravel()
    q_n, q_p = 2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1

    def codes(step):
        return np.clip(np.round(v / step), -q_n, q_p)

    largest = np.max(np.abs(v))
    starts = [largest / q_p * 2.0 ** (-0.25 * j) for j in range(12)] + [2.0 * np.mean(np.abs(v)) / np.sqrt(q_p)]
    if bits <= 8:
        starts.append(step_search.gaussian_step_ratio(q_n, q_p) * np.sqrt(np.mean(v * v)))
    best, best_error = None, None
    for start in starts:
        step = np.float32(max(start, ops.MIN_STEP))
        for _ in range(3):
            k = codes(step)
            norm = np.sum(k * k)
            step = np.float32(max(np.sum(v * k) / max(norm, 1.0) if norm > 0 else step, ops.MIN_STEP))
        error = np.sum((codes(step) * step - v) ** 2)
        if best is None or error < best_error:
            best, best_error = step, error
    return best


def test_phase_schedule_against_hand_computation():
    schedule = progressive_bits.Schedule((8, 4, 2), 10)
    # 10 steps in 3 phases: starts floor(10 p / 3) = 0, 3, 6; the last phase takes the remainder.
    assert schedule.starts == [0, 3, 6]
    assert [schedule.phase_of(step) for step in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert [schedule.end(p) for p in range(3)] == [3, 6, 10]
    assert [step for step in range(11) if schedule.at_phase_start(step)] == [3, 6]
    assert schedule.phase_of(10) == 2  # a finished run stays in the last phase
    assert progressive_bits.Schedule((4, 2), 12).starts == [0, 6]
    assert progressive_bits.Schedule((8, 6, 4, 3), 13).starts == [0, 3, 6, 9]


def test_phase_steps_are_lsq_start_at_the_phase_bits(progressive_run):
    """Each phase-end checkpoint's weight steps equal LSQ's start at the phase's bits computed in NumPy from the weights
    the phase started with (the float checkpoint, then the previous phase's last weights)."""
    learner, results, directory = progressive_run
    float_checkpoint = results["float_checkpoint"]
    reader = tf.train.load_checkpoint(float_checkpoint)
    started_with = {name: reader.get_tensor(name) for name in WEIGHTS}
    previous_steps = None
    for bits, step in zip(WIDTHS, PHASE_ENDS):
        values = checkpoint_values(directory, step)
        assert int(values["global_step"]) == step
        for name in WEIGHTS:
            steps = values[name + "_quant/lsq_step"]
            weight = started_with[name]
            want = np.array([numpy_lsq_start(weight[..., c], bits) for c in range(weight.shape[-1])])
            np.testing.assert_allclose(steps, want, rtol=1e-4, err_msg="%s at %d bits" % (name, bits))
            # Its counter restarted at the phase start: it counts this phase's steps only.
            assert int(values[name + "_quant/init_steps"]) == 4
        for name in ACTIVATIONS:
            assert int(values[name + "/act_quant/init_steps"]) == 4
            if previous_steps is not None:
                # Re-fitted at the narrower grid (2.8 times the 8-bit step at 4 bits here); left alone it would stay
                # at the previous phase's step, which its negligible learning rate hardly moves.
                assert values[name + "/act_quant/lsq_step"] > 2.0 * previous_steps[name]
        previous_steps = {name: values[name + "/act_quant/lsq_step"] for name in ACTIVATIONS}
        started_with = {name: values[name] for name in WEIGHTS}


def test_weights_lie_on_each_phase_grid(progressive_run):
    """At each phase end the layers' quantized weights take at most 2^bits levels per channel, and (but at the last
    phase) more than the next phase's grid could hold in some channel with enough weights for that (conv1's channels
    hold 9): the phase trained at its own width."""
    _, _, directory = progressive_run
    layout = tfquant.GroupLayout("channel", channel_axes=(-1,))
    for phase, (bits, step) in enumerate(zip(WIDTHS, PHASE_ENDS)):
        values = checkpoint_values(directory, step)
        with tf.Graph().as_default(), tf1.Session() as sess:
            quantized = sess.run({name: weight_grids.lsq_quantize_weight(
                tf.constant(values[name]), tf.constant(values[name + "_quant/lsq_step"]), bits, layout)
                for name in WEIGHTS})
        for name in WEIGHTS:
            levels = [len(np.unique(quantized[name][..., c])) for c in range(quantized[name].shape[-1])]
            assert max(levels) <= 2 ** bits, (name, bits)
            if phase + 1 < len(WIDTHS) and values[name][..., 0].size > 2 ** (WIDTHS[phase + 1] + 1):
                assert max(levels) > 2 ** WIDTHS[phase + 1], (name, bits, levels)


def test_final_checkpoint_exports_bit_exact_on_final_grid(progressive_run, tmp_path):
    """The report, accounting and packed model are the final (2-bit) graph's: the packed weights are the checkpoint's
    weights on the 2-bit grid (NumPy and the graph's quantizer), and reloading it gives the run's accuracy."""
    from tfquant.export import model_export
    learner, results, directory = progressive_run
    with open(os.path.join(directory, "models_uql", "results.json")) as handle:
        written = json.load(handle)
    assert written["progressive_bits"] == {"widths": [8, 4, 2], "phase_starts": [0, 4, 8], "nb_iters": 12}
    assert results["quant_checkpoint"].endswith("model.ckpt-12")
    report = tfquant.report.read_report(results["report"])
    assert {layer.bits for layer in report.layers if layer.quantized} == {2}
    plain = graphs.build_graph(helper_of(), False, quant_config=CONFIG).report
    assert results["quant_storage_bits"] == plain.total_storage_bits
    packed = str(tmp_path / "model.tfq")
    model_export.pack_checkpoint(results["quant_checkpoint"], results["report"], packed)
    weights, _ = model_export.load_packed_weights(packed)
    values = checkpoint_values(directory, 12)
    layout = tfquant.GroupLayout("channel", channel_axes=(-1,))
    with tf.Graph().as_default(), tf1.Session() as sess:
        graph_values = sess.run({name: weight_grids.lsq_quantize_weight(
            tf.constant(values[name]), tf.constant(values[name + "_quant/lsq_step"]), 2, layout) for name in WEIGHTS})
    for name in WEIGHTS:
        step = values[name + "_quant/lsq_step"]
        want = np.clip(np.round(values[name] / step), -2, 1) * step
        np.testing.assert_allclose(weights[name], want, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(weights[name], graph_values[name])
    accuracy, _, _ = learner.evaluate()
    assert accuracy == pytest.approx(results["quant_accuracy"], abs=1e-6)


def test_killed_run_resumes_in_its_phase(progressive_run, tmp_path, monkeypatch):
    """A run killed after its step-6 checkpoint (phase 2 of 3) restarts in phase 2 at 4 bits without re-initialising
    its ranges (their counters go on from step 4), and ends on the uninterrupted run's result."""
    _, _, directory = progressive_run
    copy = str(tmp_path / "run")
    shutil.copytree(directory, copy)
    models = os.path.join(copy, "models_uql")
    for name in os.listdir(models):
        if name.startswith(("model.ckpt-8", "model.ckpt-9", "model.ckpt-12", "results")) or name == "checkpoint":
            os.remove(os.path.join(models, name))
    lines = []
    log = training.log
    monkeypatch.setattr(training, "log", lambda message: (lines.append(message), log(message)))
    monkeypatch.setattr(checkpoints, "prune_checkpoints", lambda *args, **kwargs: None)
    results = UniformQuantLearner(helper_of(), run_settings(copy, save_step=3), CONFIG).train()
    assert lines.index("uniform: progressive bits phase 2 of 3 at 4 bits (steps 5 to 8)") < lines.index(
        "uniform: resuming from %s at step 6 of 12" % os.path.join(models, "model.ckpt-6"))
    assert not any("phase 1 of 3" in line for line in lines)
    for step in (8, 12):
        resumed, uninterrupted = checkpoint_values(copy, step), checkpoint_values(directory, step)
        assert set(resumed) == set(uninterrupted)
        for name, value in uninterrupted.items():
            if np.asarray(value).dtype.kind in "fi":
                np.testing.assert_allclose(resumed[name], value, rtol=1e-5, atol=1e-7, err_msg="%s %d" % (name, step))
    assert int(checkpoint_values(copy, 8)["model/conv1/weights_quant/init_steps"]) == 4
    assert results["quant_checkpoint"].endswith("model.ckpt-12")


def test_reset_zeroes_counters_and_range_slots_only(progressive_run):
    """The phase-start op sets the learned ranges' counters and their optimizer slots to zero and nothing else."""
    _, results, directory = progressive_run
    report = tfquant.report.read_report(results["report"])
    config = progressive_bits.phase_config(CONFIG, report, 4)
    model = graphs.build_graph(helper_of(), True, quant_config=config,
                               lrn_rate_fn=graphs.cosine_lrn_rate(0.05, 12), skip_batches=4,
                               training_recipes=UniformQuantLearner(helper_of(), run_settings(directory), CONFIG)
                               ._training_recipes(12))
    reset = progressive_bits.reset_op(model.graph)
    checkpoint = os.path.join(directory, "models_uql", "model.ckpt-4")
    variables = [v for v in model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)
                 if v.op.name != tfquant.report.DECISIONS_VARIABLE]
    with graphs.new_session(model.graph, optimize_graph=False) as sess:
        sess.run(model.init_op)
        graphs.restore_variables(sess, variables, checkpoint)
        sess.run(reset)
        after = sess.run({v.op.name: v for v in variables})
    before = checkpoint_values(directory, 4)
    zeroed = {name for name in after if name.endswith("/init_steps") or name.endswith("/RangeMomentum")}
    assert len([name for name in zeroed if name.endswith("/RangeMomentum")]) == 5  # 3 weight, 2 activation steps
    assert all(np.any(before[name] != 0) for name in zeroed)
    for name, value in after.items():
        if name in zeroed:
            assert np.all(value == 0), name
        else:
            np.testing.assert_array_equal(value, before[name], err_msg=name)
    # The phase's graph is at 4 bits where the run ends at 2: its report says so.
    assert {layer.bits for layer in model.report.layers if layer.quantized} == {4}


def test_phase_config_widens_only_narrower_layers():
    """max(phase width, layer width) per layer; float layers stay float, a ternary layer ternary, 8-bit activations
    8-bit (W4 with a 2-bit conv1, a ternary conv2 and a float fc, at a 6-bit phase)."""
    overrides = tfquant.parse_overrides("overrides", ["model/conv1/weights=2", "model/conv2/weights=2:ternary",
                                                      "model/fc/weights=32"])
    config = tfquant.QuantConfig(weight_bits=4, activation_bits=8, quantize_all_layers=True,
                                 weight_overrides=overrides)
    report = graphs.build_graph(helper_of(), False, quant_config=config).report
    bits = {layer.name: layer.bits for layer in
            graphs.build_graph(helper_of(), False,
                               quant_config=progressive_bits.phase_config(config, report, 6)).report.layers}
    final = {layer.name: layer.bits for layer in report.layers}
    assert final == {"model/conv1/Conv2D": 2, "model/conv2/Conv2D": 2, "model/fc/MatMul": 32,
                     "model/Relu": 8, "model/Relu_1": 8}
    assert bits == {"model/conv1/Conv2D": 6, "model/conv2/Conv2D": 2, "model/fc/MatMul": 32,
                    "model/Relu": 8, "model/Relu_1": 8}


def test_progressive_flags_are_refused_with_one_line():
    from learners import flags as learner_flags
    learner_flags.define_flags()
    flags = learner_flags.FLAGS
    lsq = ["--learner=uniform", "--uql_weight_range=lsq", "--uql_weight_bits=2"]
    for argv, message in (
            (lsq + ["--uql_progressive_bits=8,x,2"], "entry 'x' is not valid"),
            (lsq + ["--uql_progressive_bits=2"], "expected at least two widths"),
            (lsq + ["--uql_progressive_bits=4,8,2"], "expected strictly decreasing widths"),
            (lsq + ["--uql_progressive_bits=8,4,4,2"], "expected strictly decreasing widths"),
            (lsq + ["--uql_progressive_bits=20,4,2"], "expected widths from 2 to 16"),
            (lsq + ["--uql_progressive_bits=8,4"], "ends at 4, but --uql_weight_bits=2"),
            (["--learner=uniform", "--uql_weight_bits=32", "--uql_activation_bits=4", "--uql_progressive_bits=8,2"],
             "but --uql_activation_bits=4"),
            (["--learner=uniform", "--uql_weight_bits=32", "--uql_progressive_bits=8,2"], "float weights and"),
            (["--learner=uniform", "--uql_weight_range=ternary", "--uql_weight_bits=2", "--uql_progressive_bits=8,2"],
             "--uql_weight_range=ternary"),
            (lsq + ["--uql_progressive_bits=8,2", "--uql_track_oscillations"], "--uql_track_oscillations"),
            (["--learner=ptq", "--uql_weight_bits=2", "--uql_progressive_bits=8,2"], "expected --learner=uniform")):
        flags.unparse_flags()
        flags(["prog"] + argv)
        try:
            with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
                learner_flags.validate_flags()
            assert "\n" not in str(caught.value) and "--uql_progressive_bits" in str(caught.value)
        finally:
            flags.unparse_flags()
    flags(["prog"])
    schedule_settings = settings_in("/nonexistent", uql_progressive_bits=["8", "4", "2"], uql_weight_bits=2)
    with pytest.raises(UserError, match="needs at least 3 fine-tuning steps, one per phase"):
        progressive_bits.schedule_for(schedule_settings, 2)
    assert progressive_bits.schedule_for(schedule_settings, 3).starts == [0, 1, 2]
