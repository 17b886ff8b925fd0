"""A run directory belongs to its learners and its settings: shared directories, changed settings, copies.

One float+quantized ConvNet run with both learners in ONE directory (DIR/float.ckpt, DIR/quant.ckpt) is
shared by the tests below; each test works on a copy of it.
"""
import glob
import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tests.learners.test_end_to_end import run_script
from tests.learners.test_reliability import SCRIPT, TOTAL, UNIFORM, _error_line

SHARED = ["--save_path=run/float.ckpt", "--uql_save_quant_model_path=run/quant.ckpt", "--log_dir=run/logs"]


def _values(checkpoint):
    reader = tf.train.load_checkpoint(checkpoint)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _snapshot(directory):
    """{relative path: bytes} of every file under `directory` except TensorBoard events."""
    found = {}
    for path in sorted(glob.glob(os.path.join(str(directory), "**"), recursive=True)):
        if os.path.isfile(path) and "/logs/" not in path:
            with open(path, "rb") as handle:
                found[os.path.relpath(path, str(directory))] = handle.read()
    return found


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """A uniform run (float phase first) whose float and quantized checkpoints share one directory."""
    cwd = tmp_path_factory.mktemp("shared")
    result = run_script(SCRIPT, UNIFORM + SHARED, str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


def test_shared_directory_fine_tunes_and_names_the_quantized_checkpoint(shared_run):
    cwd, result = shared_run
    run = cwd / "run"
    out = result.stdout
    # The quantized phase really trained: every one of its iterations ran, from step 1.
    assert "uniform: resuming" not in out
    progress = [int(i) for i in re.findall(r"uniform iter (\d+)/%d" % TOTAL, out)]
    assert progress == [5, 10, 15, TOTAL], out  # --summ_step=5, from step 0
    results = json.load(open(run / "results.json"))
    assert results["quant_checkpoint"] == str(run / ("quant.ckpt-%d" % TOTAL))
    assert results["float_checkpoint"] == str(run / ("float.ckpt-%d" % TOTAL))
    match = re.search(r"quantized accuracy: .*\((\S+)\)$", out, re.M)
    assert match.group(1) == str(run / ("quant.ckpt-%d" % TOTAL))
    quant = _values(str(run / ("quant.ckpt-%d" % TOTAL)))
    float_ = _values(str(run / ("float.ckpt-%d" % TOTAL)))
    assert int(quant["global_step"]) == TOTAL and int(float_["global_step"]) == TOTAL
    assert any(name.endswith("act_quant/ema_min") for name in quant)
    assert not any("act_quant" in name for name in float_)
    # Fine-tuning moved the weights away from the float model it started from.
    assert not np.array_equal(quant["model/conv2/weights"], float_["model/conv2/weights"])
    # Each prefix kept its own newest three checkpoints (10, 15, 20 with --save_step=5).
    for prefix in ("float.ckpt", "quant.ckpt"):
        steps = sorted(int(p.rsplit("-", 1)[1][:-len(".index")]) for p in glob.glob(str(run / (prefix + "-*.index"))))
        assert steps == [10, 15, TOTAL], (prefix, steps)
    record = json.load(open(run / "quant.ckpt.settings.json"))
    assert record["float_checkpoint"] == "float.ckpt-%d" % TOTAL
    assert record["settings"]["uql_activation_bits"] == 8 and record["settings"]["batch_size"] == 32
    assert json.load(open(run / "float.ckpt.settings.json"))["settings"]["lrn_rate_init"] == 0.01


def test_changed_settings_are_refused_with_every_difference(shared_run, tmp_path):
    cwd = tmp_path / "work"
    shutil.copytree(str(shared_run[0]), str(cwd))
    before = _snapshot(cwd / "run")
    args = [a for a in UNIFORM if not a.startswith(("--lrn_rate_init", "--uql_activation_bits"))]
    result = run_script(SCRIPT, args + SHARED + ["--lrn_rate_init=0.02", "--uql_activation_bits=4"], str(cwd))
    line = _error_line(result)
    assert "--lrn_rate_init 0.01 (recorded) vs 0.02 (now)" in line, line
    assert "--uql_activation_bits 8 (recorded) vs 4 (now)" in line, line
    assert "delete or move %s" % (cwd / "run") in line, line
    assert "iter" not in result.stdout
    assert _snapshot(cwd / "run") == before  # nothing resumed, overwritten or pruned


def test_float_settings_changed_after_quantized_training_are_refused(shared_run, tmp_path):
    cwd = tmp_path / "work"
    shutil.copytree(str(shared_run[0]), str(cwd))
    # The float model is retrained elsewhere with other settings; its old record is gone with it.
    for path in glob.glob(str(cwd / "run" / "float.ckpt*")):
        os.remove(path)
    args = [a for a in UNIFORM if not a.startswith("--nb_epochs_rat")] + ["--nb_epochs_rat=0.5"]
    line = _error_line(run_script(SCRIPT, args + SHARED, str(cwd)))
    assert re.search(r"settings differ from the run recorded beside \S+quant\.ckpt\.settings\.json: "
                     r"--nb_epochs_rat 0\.83 \(recorded\) vs 0\.5 \(now\)", line), line


def test_copied_run_directory_never_reads_the_original(shared_run, tmp_path):
    original = tmp_path / "original"
    shutil.copytree(str(shared_run[0]), str(original))
    # A state file as older runs wrote it: absolute paths into the original directory.
    with open(original / "run" / "checkpoint", "w") as handle:
        handle.write('model_checkpoint_path: "%s"\nall_model_checkpoint_paths: "%s"\n'
                     % (original / "run" / "quant.ckpt-20", original / "run" / "quant.ckpt-20"))
    copy = tmp_path / "copy"
    shutil.copytree(str(original), str(copy))
    for path in glob.glob(str(original / "run" / "quant.ckpt-*")):
        with open(path, "r+b") as handle:  # the original's checkpoints become unreadable
            handle.truncate(10)
    result = run_script(SCRIPT, UNIFORM + SHARED + ["--exec_mode=eval"], str(copy))
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if "outside its directory" in line]
    assert len(notes) == 1 and "names 1 path(s) outside its directory" in notes[0], result.stdout
    assert str(original) not in "\n".join(set(result.stdout.splitlines()) - set(notes)) + result.stderr
    accuracy = float(re.search(r"uniform eval: accuracy ([0-9.]+)", result.stdout).group(1))
    assert accuracy == pytest.approx(json.load(open(copy / "run" / "results.json"))["quant_accuracy"], abs=1e-4)
    # The copy's own checkpoints gone: an error, never the original's.
    for path in glob.glob(str(copy / "run" / "quant.ckpt-*")):
        os.remove(path)
    line = _error_line(run_script(SCRIPT, UNIFORM + SHARED + ["--exec_mode=eval"], str(copy)))
    assert "no quantized checkpoint found in %s" % (copy / "run") in line and str(original) not in line


def test_eval_refuses_a_report_whose_bits_differ(shared_run, tmp_path):
    cwd = tmp_path / "work"
    shutil.copytree(str(shared_run[0]), str(cwd))
    path = cwd / "run" / "quant_report.json"
    report = json.load(open(path))
    weights = [layer for layer in report["layers"] if layer["kind"] == "weight" and layer["status"] == "quantized"]
    weights[0]["bits"] = 2  # same names and shapes; another model
    weights[0]["weight_storage_bits"] = 2 * weights[0]["num_params"]  # a self-consistent report of that model
    with open(path, "w") as handle:
        json.dump(report, handle)
    line = _error_line(run_script(SCRIPT, UNIFORM + SHARED + ["--exec_mode=eval"], str(cwd)))
    assert re.search(r"quantization report \S+ does not match this checkpoint's model: layer \d+ \(%s\) has bits 2 "
                     r"in the report, 4 in the checkpoint" % re.escape(weights[0]["name"]), line), line
