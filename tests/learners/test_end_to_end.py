"""Short end-to-end runs of both learners through the run scripts: checkpoints, report, events, eval."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["--train_subset=256", "--eval_subset=200", "--batch_size=32", "--batch_size_eval=64",
         "--nb_epochs_rat=0.02", "--uql_quant_epochs=0.5", "--summ_step=2"]


def run_script(script, args, cwd):
    """Run nets/<script> in `cwd`; returns the CompletedProcess (stdout and stderr as text)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "nets", script)] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def event_tags(directory):
    """{tag: [values]} of scalar summaries, and whether a graph was written, from event files."""
    tags, has_graph = {}, False
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            has_graph = has_graph or bool(event.graph_def)
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(value.simple_value)
    return tags, has_graph


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory):
    """One uniform run (which first trains a float model), shared by the tests below."""
    cwd = tmp_path_factory.mktemp("uniform")
    result = run_script("resnet_at_fmnist_run.py", ["--learner=uniform", "--uql_activation_bits=8",
                                                    "--uql_use_buckets", "--uql_weight_overrides=.*stage3.*=2"]
                        + QUICK, str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


def test_uniform_trains_float_first_and_reports(uniform_run):
    cwd, result = uniform_run
    out = result.stdout
    assert "no float checkpoint" in out and "training one with the full-precision learner first" in out
    float_acc = float(re.search(r"float accuracy:\s+([0-9.]+)", out).group(1))
    quant_acc = float(re.search(r"quantized accuracy:\s+([0-9.]+)\s+on 200 test images", out).group(1))
    results = json.load(open(cwd / "models_uql" / "results.json"))
    assert results["float_accuracy"] == pytest.approx(float_acc, abs=1e-4)
    assert results["quant_accuracy"] == pytest.approx(quant_acc, abs=1e-4)
    assert results["test_examples"] == 200
    # Progress lines: iteration/total, loss, accuracy, learning rate, speed, time remaining.
    assert re.search(r"uniform iter 2/\d+ \| loss [0-9.]+ \| acc [0-9.]+ \| lr [0-9.]+ \| \d+ img/s \| "
                     r"remaining \dm\d\ds", out)


def test_report_json_contents(uniform_run):
    cwd, _ = uniform_run
    report = json.load(open(cwd / "models_uql" / "quant_report.json"))
    weights = [layer for layer in report["layers"] if layer["kind"] == "weight"]
    assert len(weights) == 22  # ResNet-20: 19 convs + 2 projection shortcuts + fc
    assert weights[0]["status"] == "skipped" and weights[0]["reason"].startswith("first layer kept float")
    assert weights[-1]["status"] == "skipped" and weights[-1]["reason"].startswith("last layer kept float")
    for layer in weights[1:-1]:
        assert layer["status"] == "quantized" and layer["bucket_type"] == "channel"
        assert layer["bits"] == (2 if "stage3" in layer["weight_variable"] else 4)
        assert layer["num_groups"] == layer["shape"][3]
        assert layer["weight_storage_bits"] == layer["num_params"] * layer["bits"]
        assert layer["bucket_storage_bits"] == 64 * layer["shape"][3]
    acts = [layer for layer in report["layers"] if layer["kind"] == "activation"]
    assert len(acts) == 19 and all(a["status"] == "quantized" and a["bits"] == 8 for a in acts)
    assert report["summary"]["total_storage_bits"] == sum(
        layer["weight_storage_bits"] + layer["bucket_storage_bits"] for layer in weights) + sum(
        32 * int(np.prod(v["shape"])) for v in report["other_variables"])


def test_checkpoints_hold_float_weights_and_activation_ranges(uniform_run):
    cwd, _ = uniform_run
    float_ckpt = tf.train.latest_checkpoint(str(cwd / "models"))
    quant_ckpt = tf.train.latest_checkpoint(str(cwd / "models_uql"))
    float_reader, quant_reader = tf.train.load_checkpoint(float_ckpt), tf.train.load_checkpoint(quant_ckpt)
    shapes = quant_reader.get_variable_to_shape_map()
    assert shapes["model/stage1/block0/conv1/weights"] == [3, 3, 16, 16]
    assert shapes["model/fc/weights"] == [64, 10]
    # 2 stages-worth of 3 blocks... every one of the 19 activations has a saved moving-average range.
    mins = [n for n in shapes if n.endswith("act_quant/ema_min")]
    assert len(mins) == 19
    for name in mins:
        lo, hi = quant_reader.get_tensor(name), quant_reader.get_tensor(name.replace("ema_min", "ema_max"))
        assert np.isfinite(lo) and np.isfinite(hi) and hi > lo >= 0  # ReLU outputs
        assert quant_reader.get_tensor(name.replace("ema_min", "ema_steps")) == \
            quant_reader.get_tensor("global_step")
    # Fine-tuning changed the float shadow weights (and they are still floats, not codes).
    before = float_reader.get_tensor("model/stage2/block1/conv1/weights")
    after = quant_reader.get_tensor("model/stage2/block1/conv1/weights")
    assert after.dtype == np.float32 and not np.array_equal(before, after)
    assert len(np.unique(after)) > 100


def test_tensorboard_events(uniform_run):
    cwd, _ = uniform_run
    tags, has_graph = event_tags(str(cwd / "logs" / "uniform" / "train"))
    assert has_graph
    for tag in ("loss", "accuracy", "lrn_rate"):
        assert tag in tags and all(np.isfinite(tags[tag]))
    assert tags["quant_bits/model/stage3/block1/conv1/weights"][0] == 2.0
    assert tags["quant_bits/model/conv0/weights"][0] == 32.0
    errors = tags["quant_error/model/stage3/block1/conv1/weights"]
    assert all(0.0 < e < 1.0 for e in errors)
    # 2-bit layers lose more than 4-bit ones.
    assert np.mean(errors) > np.mean(tags["quant_error/model/stage2/block1/conv1/weights"])
    float_tags, float_graph = event_tags(str(cwd / "logs" / "full-prec" / "train"))
    assert float_graph and "loss" in float_tags and not any(t.startswith("quant_") for t in float_tags)
    eval_tags, _ = event_tags(str(cwd / "logs" / "uniform" / "eval"))
    results = json.load(open(cwd / "models_uql" / "results.json"))
    assert eval_tags["eval/accuracy"][-1] == pytest.approx(results["quant_accuracy"], abs=1e-6)


def test_eval_mode_reproduces_training_accuracy(uniform_run):
    cwd, _ = uniform_run
    results = json.load(open(cwd / "models_uql" / "results.json"))
    # Different quantization flags on purpose: eval rebuilds the model from the saved report's config.
    result = run_script("resnet_at_fmnist_run.py", ["--learner=uniform", "--exec_mode=eval",
                                                    "--uql_weight_bits=8"] + QUICK, str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"uniform eval: accuracy ([0-9.]+)", result.stdout).group(1))
    assert accuracy == pytest.approx(results["quant_accuracy"], abs=1e-4)
    result = run_script("resnet_at_fmnist_run.py", ["--learner=full-prec", "--exec_mode=eval"] + QUICK, str(cwd))
    accuracy = float(re.search(r"full-prec eval: accuracy ([0-9.]+)", result.stdout).group(1))
    assert accuracy == pytest.approx(results["float_accuracy"], abs=1e-4)


def test_full_prec_checkpoint_contents(tmp_path):
    result = run_script("convnet_at_fmnist_run.py", ["--learner=full-prec", "--save_step=3"] + QUICK, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tf.train.latest_checkpoint(str(tmp_path / "models"))
    reader = tf.train.load_checkpoint(checkpoint)
    shapes = reader.get_variable_to_shape_map()
    step = int(reader.get_tensor("global_step"))
    assert checkpoint.endswith("-%d" % step) and step >= 1
    assert shapes["model/conv1/weights"] == [5, 5, 1, 32] and shapes["model/fc3/weights"] == [7 * 7 * 64, 1024]
    assert not any("act_quant" in name for name in shapes)
    assert re.search(r"full-prec iter %d/%d" % (step, step), result.stdout)


def test_export_mode_files_predict_as_the_checkpoint(uniform_run):
    """--exec_mode export packs the latest quantized checkpoint from the run directory (no model registry)
    and evaluates the files on the run script's own test images."""
    cwd, _ = uniform_run
    results = json.load(open(cwd / "models_uql" / "results.json"))
    from tfquant.export import onnx_export
    onnx = onnx_export.available()
    result = run_script("resnet_at_fmnist_run.py", ["--learner=uniform", "--exec_mode=export", "--export_dir=exp",
                                                    "--export_int8"] + (["--export_onnx"] if onnx else []) + QUICK,
                        str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = {kind: float(value) for kind, value in re.findall(r"^accuracy (\S+)\s+([0-9.]+)$", result.stdout, re.M)}
    assert sorted(accuracy) == sorted(["frozen_graph", "quantized_checkpoint", "tflite_float", "tflite_int8"]
                                      + (["onnx"] if onnx else []))
    agreement = dict(re.findall(r"^agreement with TF graph (\S+)\s+([0-9.]+)(?: \(\d+ images differ, \d+ of them "
                                r"with tied top logits\))?$", result.stdout, re.M))
    assert sorted(agreement) == sorted(set(accuracy) - {"quantized_checkpoint"})
    assert accuracy["quantized_checkpoint"] == pytest.approx(results["quant_accuracy"], abs=1e-4)
    assert accuracy["frozen_graph"] == accuracy["quantized_checkpoint"]
    exported = json.load(open(cwd / "exp" / "export.json"))
    assert exported["test_images"] == results["test_examples"] == 200
    assert exported["checkpoint"] == os.path.abspath(results["quant_checkpoint"])
    assert exported["frozen_vs_checkpoint"]["argmax_agreement"] == 1.0
    for entry in exported["files"].values():
        assert os.path.getsize(cwd / "exp" / entry["name"]) == entry["bytes"]
    assert sorted(os.listdir(cwd / "exp")) == sorted(["export.json", "inference.pb", "model.tfq", "model_float.tflite",
                                                      "model_int8.tflite"] + (["model.onnx"] if onnx else []))
    # The int8 model carries the trained activation ranges (the default since the deployment export).
    assert "trained ranges" in exported["int8"]["activation_ranges"]
    # ... and where its integer arithmetic departs from the TF graph, tensor by tensor (200 test images here).
    divergence = exported["int8_layer_divergence"]
    assert divergence["images"] == 200 and divergence["layers"][0] == {
        "op": "(input)", "tensor": "input/fake_quant/FakeQuantWithMinMaxVars:0", "differ": 0.0, "max_steps": 0}
    assert all(r["tensor"] and 0 <= r["differ"] <= 1 for r in divergence["layers"])
    assert re.search(r"^int8 codes that differ from the TF graph's: [0-9.]+ % of the first operator's output, "
                     r"[0-9.]+ % of the model's", result.stdout, re.M)
    assert exported["agreement_with_quantized_tf"]["frozen_graph"] == 1.0
    for label, share in exported["agreement_with_quantized_tf"].items():
        differ = exported["disagreements_with_quantized_tf"][label]
        assert differ["images"] == round((1 - share) * 200) and 0 <= differ["tied"] <= differ["images"]
        assert float(agreement[label]) == pytest.approx(share, abs=1e-4)
    # The float learner has no quantized checkpoint to export: one line, nothing written.
    result = run_script("resnet_at_fmnist_run.py", ["--learner=full-prec", "--exec_mode=export",
                                                    "--export_dir=exp2"] + QUICK, str(cwd))
    assert result.returncode == 2 and result.stderr.startswith("error: --exec_mode=export is not valid")
    assert result.stderr.count("\n") == 1 and not (cwd / "exp2").exists()


@pytest.mark.parametrize("flags,fragment", [
    (["--exec_mode=export"], "error: --export_dir is not set"),
    (["--exec_mode=export", "--export_dir=out"], "error: checkpoint_dir="),
    (["--exec_mode=export", "--export_dir=out", "--export_int8_calibration"],
     "error: --export_int8_calibration is not valid without --export_int8"),
])
def test_export_mode_bad_input_is_one_line(tmp_path, flags, fragment):
    result = run_script("convnet_at_fmnist_run.py", ["--learner=uniform"] + flags + QUICK, str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(fragment), result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
