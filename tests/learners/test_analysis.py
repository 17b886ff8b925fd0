"""Per-layer fidelity and the layer-by-layer analysis against independent references.

One PTQ run of the template CNN (3-bit weights and activations, every layer quantized, percentile ranges so
activations clip) is checked against: a plain float graph (no tfquant) whose weights are loaded with NumPy's
quantized values and whose activations are fed back quantized by NumPy (fidelity, accumulated error, logits);
and a separately built tfquant graph per mixture (the analysis's accuracies and ranking, brute force).
"""
import glob
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from learners import analysis, graphs, layer_analysis
from learners import flags as learner_flags
from learners.errors import UserError
from learners.ptq import PTQLearner
from nets import model_template
from tests.learners.test_ptq import settings_in
from tests.tfquant import reference

tf1 = tf.compat.v1
BITS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("analysis"))
    helper = model_template.ModelHelper(batch_size=32, batch_size_eval=50, train_subset=256, eval_subset=100,
                                        nb_epochs_rat=3, seed=0)
    settings = settings_in(directory, uql_calibrator="percentile", uql_calib_percentile=99.0, batch_size_eval=50,
                           uql_analysis_batches=2)
    config = tfquant.QuantConfig(weight_bits=BITS, activation_bits=BITS, quantize_all_layers=True)
    results = PTQLearner(helper, settings, config).train()
    lines = layer_analysis.analyze(helper, settings, PTQLearner(helper, settings, config))
    run_dir = os.path.join(directory, "models_uql")
    report = json.load(open(os.path.join(run_dir, "quant_report.json")))
    return dict(helper=helper, settings=settings, results=results, run_dir=run_dir, report=report, lines=lines,
                analysis=json.load(open(os.path.join(run_dir, "analysis.json"))))


def _sqnr(reference_values, values):
    reference_values = np.asarray(reference_values, np.float64)
    return 10 * math.log10(np.sum(reference_values ** 2) / np.sum((reference_values - values) ** 2))


def _quantize_activation(x, low, high, bits=BITS):
    """The moving-average grid of an evaluation graph, in NumPy: [low, high], values outside clipped."""
    levels = 2 ** bits - 1
    alpha = np.float32(high - low) + np.float32(1e-10)
    codes = np.clip(np.round((x - low) * (levels / alpha)), 0, levels)
    return (codes * (alpha / levels) + low).astype(np.float32)


def _reference_network(run):
    """Float network (no tfquant) on the fidelity images, and the same with NumPy-quantized weights and
    activations fed back in layer by layer. Returns ({tensor name: float value}, {tensor name: quantized})."""
    helper, report = run["helper"], run["report"]
    images, _ = analysis.evaluation_arrays(helper, 100)
    checkpoint = tf.train.load_checkpoint(run["results"]["quant_checkpoint"])
    weights = [layer for layer in report["layers"] if layer["kind"] == "weight"]
    names = ["model/Relu:0", "model/Relu_1:0", "model/conv1/Conv2D:0", "model/conv2/Conv2D:0", "model/fc/MatMul:0"]
    graph = tf.Graph()
    with graph.as_default():
        placeholder = tf1.placeholder(tf.float32, [None] + list(images.shape[1:]))
        logits = helper.forward_eval(placeholder)
        variables = {v.op.name: v for v in tf1.global_variables()}
        with tf1.Session() as sess:
            for name, variable in variables.items():
                variable.load(checkpoint.get_tensor(name), sess)  # noqa (assign would add ops)
            floats = dict(zip(names + ["logits"], sess.run([graph.get_tensor_by_name(n) for n in names] + [logits],
                                                          {placeholder: images})))
            for layer in weights:
                variables[layer["weight_variable"]].load(
                    reference.quantize_np(checkpoint.get_tensor(layer["weight_variable"]), BITS), sess)
            quantized, feed = {}, {placeholder: images}
            for activation in ("model/Relu", "model/Relu_1"):
                x = sess.run(activation + ":0", feed)
                low, high = (checkpoint.get_tensor(activation + "/act_quant/ema_" + e) for e in ("min", "max"))
                quantized[activation + ":x"] = x
                quantized[activation + ":0"] = feed[graph.get_tensor_by_name(activation + ":0")] = \
                    _quantize_activation(x, low, high)
                quantized[activation + ":range"] = (low, high)
            rest = ["model/conv1/Conv2D:0", "model/conv2/Conv2D:0", "model/fc/MatMul:0"]
            quantized.update(zip(rest + ["logits"], sess.run([graph.get_tensor_by_name(n) for n in rest] + [logits],
                                                           feed)))
    return floats, quantized, checkpoint


def test_fidelity_matches_numpy_reference(run):
    fidelity = run["report"]["fidelity"]
    by_name = {entry["name"]: entry for entry in fidelity["layers"]}
    assert fidelity["examples"] == 100 and fidelity["batches"] == 2
    floats, quantized, checkpoint = _reference_network(run)
    # Weights: the min/max grid in NumPy.
    for layer in run["report"]["layers"]:
        if layer["kind"] != "weight":
            continue
        w = checkpoint.get_tensor(layer["weight_variable"])
        q = reference.quantize_np(w, BITS)
        step = (w.max() - w.min()) / (2 ** BITS - 1)
        entry = by_name[layer["name"]]
        assert entry["sqnr_db"] == pytest.approx(_sqnr(w, q), rel=1e-4)
        assert entry["rmse_over_step"] == pytest.approx(np.sqrt(np.mean(((w - q) / step) ** 2)), rel=1e-4)
        assert entry["clipped_fraction"] == 0.0
        assert entry["range_used"] == pytest.approx([w.min(), w.max()], rel=1e-5)
        assert sum(entry["histogram"]["counts"]) == w.size and len(entry["levels"]) <= 2 ** BITS
    # Activations: their quantizer's error on the values the quantized network gives them.
    clipped_somewhere = False
    for activation in ("model/Relu", "model/Relu_1"):
        x, q = quantized[activation + ":x"], quantized[activation + ":0"]
        low, high = quantized[activation + ":range"]
        step = (high - low) / (2 ** BITS - 1)
        clipped = np.mean((x > high + step / 2) | (x < low - step / 2))
        clipped_somewhere |= clipped > 0
        entry = by_name[activation]
        assert entry["sqnr_db"] == pytest.approx(_sqnr(x, q), rel=2e-3)
        assert entry["clipped_fraction"] == pytest.approx(clipped, abs=2e-5)
        assert entry["observed"] == pytest.approx([x.min(), x.max()], rel=1e-5)
        # Values are clipped, so the top level (the range's upper end) is used.
        assert entry["range_used"] == pytest.approx([low, high], rel=1e-5, abs=1e-6)
        assert entry["output_sqnr_db"] == pytest.approx(_sqnr(floats[activation + ":0"], q), rel=2e-3)
    assert clipped_somewhere  # percentile ranges: the clipped fraction is checked on a case where it is not 0
    # Accumulated error at each weight layer's output and at the logits: quantized network against float.
    for name in ("model/conv1/Conv2D", "model/conv2/Conv2D", "model/fc/MatMul"):
        assert by_name[name]["output_sqnr_db"] == pytest.approx(
            _sqnr(floats[name + ":0"], quantized[name + ":0"]), rel=2e-3), name
    assert fidelity["output"]["sqnr_db"] == pytest.approx(_sqnr(floats["logits"], quantized["logits"]), rel=2e-3)
    agreement = np.mean(np.argmax(floats["logits"], -1) == np.argmax(quantized["logits"], -1))
    assert fidelity["output"]["top1_agreement"] == pytest.approx(agreement, abs=0.011)
    # The error grows through the network: the logits carry more of it than the first layer's output.
    assert fidelity["output"]["sqnr_db"] < by_name["model/conv1/Conv2D"]["output_sqnr_db"]


def _brute_force(run, bits_of):
    """(accuracy, mean cross-entropy) of a separately built tfquant graph (no switches) on the analysis's images,
    each quantized layer at bits_of(its name, its bits) (32: float)."""
    saved = tfquant.report.read_report(os.path.join(run["run_dir"], "quant_report.json"))
    settings = {k: v for k, v in saved.config.items()
                if k not in ("weight_overrides", "activation_overrides", "layer_bits", "explicit_bits")}
    explicit = {layer.name: bits_of(layer.name, layer.bits) for layer in saved.layers if layer.quantized}
    images, labels = analysis.evaluation_arrays(run["helper"])
    graph = tf.Graph()
    with graph.as_default():
        placeholder = tf1.placeholder(tf.float32, [None] + list(images.shape[1:]))
        logits = run["helper"].forward_eval(placeholder)
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(explicit_bits=explicit, **settings),
                                        is_training=False)
        logits = report.output(logits)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        with tf1.Session() as sess:
            graphs.restore_variables(sess, tf1.global_variables(), run["results"]["quant_checkpoint"])
            values, loss_values = sess.run([logits, losses], {placeholder: images})
    return float(np.mean(np.argmax(values, -1) == labels)), float(np.mean(loss_values))


def _brute_force_accuracy(run, quantized_names):
    """Accuracy with only `quantized_names` quantized (at their bits), the others float."""
    return _brute_force(run, lambda name, bits: bits if name in quantized_names else 32)[0]


def test_analysis_matches_brute_force(run):
    result = run["analysis"]
    names = [entry["name"] for entry in result["layers"]]
    assert sorted(names) == sorted(layer["name"] for layer in run["report"]["layers"] if layer["status"] ==
                                   "quantized")
    assert result["examples"] == 100
    assert result["quantized_accuracy"] == pytest.approx(run["results"]["quant_accuracy"], abs=1e-6)
    assert result["float_accuracy"] == pytest.approx(_brute_force_accuracy(run, []), abs=1e-6)
    everything = _brute_force(run, lambda name, bits: bits)
    assert (result["quantized_accuracy"], result["quantized_loss"]) == pytest.approx(everything, rel=1e-4)
    alone, all_but, at_override = {}, {}, {}
    for name in names:
        alone[name] = _brute_force_accuracy(run, [name])
        all_but[name] = _brute_force_accuracy(run, [n for n in names if n != name])
        # Every layer quantized, this one at 8 bits: the graph the suggested override gives, built directly.
        at_override[name] = _brute_force(run, lambda layer, bits, name=name: 8 if layer == name else bits)
    for entry in result["layers"]:
        assert entry["accuracy_alone_quantized"] == pytest.approx(alone[entry["name"]], abs=1e-6)
        assert entry["accuracy_all_but_this_quantized"] == pytest.approx(all_but[entry["name"]], abs=1e-6)
        assert entry["override_bits"] == 8
        accuracy, loss = at_override[entry["name"]]
        assert entry["accuracy_at_override"] == pytest.approx(accuracy, abs=1e-6)
        assert entry["loss_at_override"] == pytest.approx(loss, rel=1e-4)
        assert entry["recovery_at_override"] == pytest.approx(accuracy - everything[0], abs=1e-5)
        assert entry["loss_recovery_at_override"] == pytest.approx(everything[1] - loss, rel=1e-3, abs=1e-5)
    # 8 bits is not float: the measurement differs from keeping the layer float somewhere (else it tests nothing).
    assert any(abs(entry["loss_at_override"] - entry["loss_all_but_this_quantized"]) > 1e-4
               for entry in result["layers"])
    # Ranked by the loss the override removes, worst first (brute-force values, sorted here).
    expected = sorted(names, key=lambda n: (-(everything[1] - at_override[n][1]), -(at_override[n][0] -
                                                                                    everything[0]), n))
    assert names == expected
    losses = [entry["loss_recovery_at_override"] for entry in result["layers"]]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1]
    # The worst layer is printed first with the 8-bit override that was measured for it.
    worst = result["layers"][0]
    assert worst["override"] in run["lines"][1] and run["lines"][1].startswith("  1. ")
    assert "at 8 bits loss %.4f" % worst["loss_at_override"] in run["lines"][1]
    if worst["kind"] == "weight":
        assert worst["override"] == "--uql_weight_overrides '%s=8'" % re.escape(worst["weight_variable"])
    else:
        assert worst["override"] == "--uql_activation_overrides '%s=8'" % re.escape(worst["name"])


def test_rank_layers_by_loss_then_accuracy():
    quantized = (0.50, 2.0)
    at_override = {"b": (0.60, 1.5), "a": (0.70, 1.5), "c": (0.90, 1.9), "d": (0.60, 1.5)}
    ranked = layer_analysis.rank_layers(quantized, at_override)
    # Loss first (c gains the most accuracy but removes the least loss), then accuracy, then the name.
    assert [name for name, _, _ in ranked] == ["a", "b", "d", "c"]
    assert ranked[0][1:] == pytest.approx((0.5, 0.2))


def test_cross_entropy_matches_tensorflow():
    logits = np.random.RandomState(0).normal(0, 20, (7, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0, 1])
    with tf.Graph().as_default(), tf1.Session() as sess:
        expected = sess.run(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    assert analysis.cross_entropy(logits, labels) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def _events(directory):
    values = {}
    for path in glob.glob(os.path.join(directory, "events.*")):
        for event in tf1.train.summary_iterator(path):
            for value in event.summary.value:
                values[value.tag] = value
    return values


def test_tensorboard_sqnr_scalars_and_histograms(run):
    events = _events(os.path.join(run["settings"].log_dir, "ptq", "fidelity"))
    for entry in run["report"]["fidelity"]["layers"]:
        tag = "sqnr_db/" + entry["name"]
        assert events[tag].simple_value == pytest.approx(entry["sqnr_db"], rel=1e-6)
    assert not any(tag.startswith("codes/") for tag in events)  # --uql_histograms is off by default
    settings = settings_in(os.path.dirname(run["run_dir"]), uql_histograms=True, batch_size_eval=50,
                           uql_analysis_batches=1, log_dir=os.path.join(os.path.dirname(run["run_dir"]), "logs2"))
    analysis.record_fidelity(run["helper"], settings, run["results"]["quant_checkpoint"], "ptq")
    events = _events(os.path.join(settings.log_dir, "ptq", "fidelity"))
    codes = events["codes/model/conv2/weights"].histo
    # 3-bit codes: 0..7, one count per weight.
    assert codes.min == 0 and codes.max == 7 and codes.num == 3 * 3 * 16 * 32
    assert events["weight/model/conv2/weights"].histo.num == 3 * 3 * 16 * 32


def test_run_script_analyze_and_eval(run):
    """--exec_mode analyze and eval through the run script: the ranking printed, the report page rewritten."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    settings = run["settings"]
    command = [sys.executable, os.path.join(root, "nets", "model_template.py"), "--learner", "ptq",
               "--save_path", settings.save_path, "--uql_save_quant_model_path", settings.uql_save_quant_model_path,
               "--log_dir", settings.log_dir, "--train_subset", "256", "--eval_subset", "100",
               "--batch_size_eval", "50"]
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(command + ["--exec_mode", "analyze"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ptq analyze: 5 layers on 100 test images")
    ranked = json.load(open(os.path.join(run["run_dir"], "analysis.json")))["layers"]
    assert [entry["name"] for entry in ranked] == [entry["name"] for entry in run["analysis"]["layers"]]
    assert ranked[0]["override"] in lines[1]
    done = subprocess.run(command + ["--exec_mode", "eval", "--uql_analysis_batches", "1"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "report: %s" % os.path.join(run["run_dir"], "quant_report.html")
    report = json.load(open(os.path.join(run["run_dir"], "quant_report.json")))
    assert report["version"] == 2 and report["fidelity"]["examples"] == 50


@pytest.mark.parametrize("args,message", [
    (["--learner=full-prec", "--exec_mode=analyze"], "--exec_mode=analyze is not valid with --learner=full-prec"),
    (["--learner=ptq", "--uql_analysis_batches=0"], "--uql_analysis_batches=0 is not valid; expected a value >= 1"),
])
def test_analysis_flags_refused(tmp_path, args, message):
    learner_flags.define_flags()
    flags = learner_flags.FLAGS
    try:
        flags.unparse_flags()
        flags(["prog", "--save_path=%s/m/model.ckpt" % tmp_path, "--uql_save_quant_model_path=%s/q/model.ckpt"
               % tmp_path, "--log_dir=%s/logs" % tmp_path] + args)
        with pytest.raises(UserError, match=re.escape(message)):
            learner_flags.validate_flags()
    finally:
        flags.unparse_flags()


def test_suggested_override_names_the_width_it_was_measured_at():
    # A ternary weight (2 bits, a grid that takes no 8 bits) is measured as float: the printed fix must say float
    # (32), not 8, which the ternary grid would refuse.
    ternary = {"kind": "weight", "bits": 2, "weight_variable": "model/conv1/weights", "name": "model/conv1/Conv2D",
               "override_bits": 32}
    assert layer_analysis.suggested_override(ternary) == "--uql_weight_overrides 'model/conv1/weights=32'"
    minmax = dict(ternary, override_bits=8)
    assert layer_analysis.suggested_override(minmax) == "--uql_weight_overrides 'model/conv1/weights=8'"
    activation = {"kind": "activation", "bits": 2, "weight_variable": None, "name": "model/Relu", "override_bits": 8}
    assert layer_analysis.suggested_override(activation) == "--uql_activation_overrides 'model/Relu=8'"
