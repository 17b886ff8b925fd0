"""--learner ptq: calibrated ranges against the float network's own activations; PTQ -> eval -> export."""
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from learners.errors import UserError
from learners import flags as learner_flags
from learners.ptq import PTQLearner
from nets import model_template

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
tf1 = tf.compat.v1


def settings_in(directory, **overrides):
    # Every flag at its default (as a run script without flags would have them), then the test's choices.
    learner_flags.define_flags()
    values = {name: learner_flags.FLAGS[name].default for name in learner_flags.FLAGS}
    values.update(save_path=os.path.join(directory, "models", "model.ckpt"),
                  uql_save_quant_model_path=os.path.join(directory, "models_uql", "model.ckpt"),
                  log_dir=os.path.join(directory, "logs"), momentum=0.9, seed=0, summ_step=50, save_step=1000,
                  batch_size=32, uql_calibrator="max", uql_calib_batches=3, uql_calib_percentile=99.99)
    values.update(overrides)
    return types.SimpleNamespace(**values)


@pytest.fixture(scope="module")
def template_helper():
    """The template ModelHelper on a Fashion-MNIST subset (loaded once: inflating the set takes seconds)."""
    return model_template.ModelHelper(batch_size=32, batch_size_eval=100, train_subset=256, eval_subset=100,
                                      nb_epochs_rat=0.25, seed=0)


def float_activation_extremes(helper, checkpoint, op_name, nb_batches):
    """(min, max) of an activation of the float network over the first training batches, no tfquant involved."""
    graph = tf.Graph()
    with graph.as_default():
        images, _ = helper.build_dataset_train()
        helper.forward_eval(images)
        values = graph.get_operation_by_name(op_name).outputs[0]
        with tf1.Session() as sess:
            tf1.train.Saver().restore(sess, checkpoint)
            batches = [sess.run(values) for _ in range(nb_batches)]
    return min(b.min() for b in batches), max(b.max() for b in batches)


def test_max_calibration_is_the_float_range_and_eval_agrees(tmp_path, template_helper):
    helper = template_helper
    settings = settings_in(str(tmp_path))
    config = tfquant.QuantConfig(weight_bits=8, activation_bits=8)
    learner = PTQLearner(helper, settings, config)
    results = learner.train()
    checkpoint = tf.train.load_checkpoint(results["quant_checkpoint"])
    # The first convolution stays float (quantize_all_layers=False): its ReLU sees the float network's values.
    lo, hi = float_activation_extremes(helper, results["float_checkpoint"], "model/Relu", 3)
    assert checkpoint.get_tensor("model/Relu/act_quant/ema_min") == pytest.approx(lo, abs=1e-6)
    assert checkpoint.get_tensor("model/Relu/act_quant/ema_max") == pytest.approx(hi, rel=1e-5)
    assert checkpoint.get_tensor("model/Relu/act_quant/ema_steps") == 3
    # The weights are the float model's, untouched.
    float_checkpoint = tf.train.load_checkpoint(results["float_checkpoint"])
    np.testing.assert_array_equal(checkpoint.get_tensor("model/conv2/weights"),
                                  float_checkpoint.get_tensor("model/conv2/weights"))
    saved = json.load(open(os.path.join(str(tmp_path), "models_uql", "results.json")))
    assert saved["activation_ranges"]["model/Relu"] == pytest.approx([lo, hi], rel=1e-5, abs=1e-6)
    assert saved["calibrator"] == "max" and saved["calib_batches"] == 3
    report = json.load(open(saved["report"]))
    assert [layer["name"] for layer in report["layers"] if layer["kind"] == "activation"] == \
        sorted(saved["activation_ranges"], key=lambda name: [layer["name"] for layer in report["layers"]].index(name))
    accuracy, _, count = learner.evaluate()
    assert count == 100 and accuracy == pytest.approx(results["quant_accuracy"], abs=1e-6)


def test_ptq_calibrates_every_int8_tensor_with_quantize_layer_outputs(tmp_path, template_helper):
    """With quantize_layer_outputs, PTQ also calibrates the model input and the logits."""
    helper = template_helper
    config = tfquant.QuantConfig(weight_bits=8, activation_bits=8, quantize_layer_outputs=True)
    results = PTQLearner(helper, settings_in(str(tmp_path)), config).train()
    report = json.load(open(results["report"]))
    ranged = {layer["name"]: layer["range_variables"] for layer in report["layers"]
              if layer["kind"] == "activation" and layer["status"] == "quantized"}
    assert {"model/conv1/Conv2D:input", "model/fc/MatMul:output"} <= set(ranged)
    checkpoint = tf.train.load_checkpoint(results["quant_checkpoint"])
    # The input range is the images' own extremes over the calibration batches (independent of any weight).
    graph = tf.Graph()
    with graph.as_default():
        images, _ = helper.build_dataset_train()
        with tf1.Session() as sess:
            batches = [sess.run(images) for _ in range(3)]
    low, high = (checkpoint.get_tensor(name) for name in ranged["model/conv1/Conv2D:input"])
    assert low == pytest.approx(min(b.min() for b in batches), abs=1e-6)
    assert high == pytest.approx(max(b.max() for b in batches), rel=1e-5)
    for name in ranged["model/fc/MatMul:output"]:
        steps = name.rpartition("/")[0] + "/ema_steps"
        assert checkpoint.get_tensor(steps) == 3


def test_batch_ranges_cannot_hold_calibration(tmp_path, template_helper):
    with pytest.raises(UserError, match="--uql_act_range=batch is not valid with --learner ptq"):
        PTQLearner(template_helper, settings_in(str(tmp_path)),
                   tfquant.QuantConfig(activation_bits=8, act_range="batch"))


def run(args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_ptq_eval_and_export_of_a_built_in_model(tmp_path):
    cwd = str(tmp_path)
    script = os.path.join(ROOT, "nets", "convnet_at_fmnist_run.py")
    common = ["--learner=ptq", "--train_subset=256", "--eval_subset=100", "--batch_size=32",
              "--batch_size_eval=50", "--nb_epochs_rat=0.3", "--uql_activation_bits=8", "--uql_weight_bits=4"]
    trained = run([script, "--uql_calibrator=percentile", "--uql_calib_batches=2"] + common, cwd)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "float accuracy:" in trained.stdout
    quant_accuracy = float(re.search(r"quantized accuracy:\s+([0-9.]+)\s+on 100 test images", trained.stdout).group(1))
    evaluated = run([script, "--exec_mode=eval"] + common, cwd)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert float(re.search(r"ptq eval: accuracy ([0-9.]+)", evaluated.stdout).group(1)) == pytest.approx(
        quant_accuracy, abs=1e-4)
    # The run script's export: the run directory's inference graph, evaluated on the same 100 test images.
    exported = run([script, "--exec_mode=export", "--export_dir=export"] + common, cwd)
    assert exported.returncode == 0, exported.stderr[-3000:]
    summary = json.load(open(os.path.join(cwd, "export", "export.json")))
    assert summary["test_images"] == 100
    assert summary["accuracy"]["quantized_checkpoint"] == pytest.approx(quant_accuracy, abs=1e-4)
    assert summary["accuracy"]["frozen_graph"] == pytest.approx(quant_accuracy, abs=0.02)
