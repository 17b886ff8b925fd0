"""Nothing lost on stop: SIGTERM/SIGINT at every kind of point of a ResNet (batch-norm) run, then resume.

One directory goes through a sequence of interrupted runs of the same command, each stopped at another
point (mid-epoch, during a save, between the phases, during evaluation, while the report
is written); the last run completes. Its float and quantized checkpoints and its accuracies must equal an
uninterrupted run's exactly: the data stream is a pure function of (seed, step) and the stops only add
checkpoints.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from learners import stopping
from tests.learners.test_end_to_end import ROOT, run_script

SCRIPT = "resnet_at_fmnist_run.py"
# 128 images / 16 per batch: 8 iterations an epoch; float 3 x 0.5 epochs = 12 iterations, quantized 1.5 = 12.
ARGS = ["--learner=uniform", "--resnet_size=20", "--train_subset=128", "--eval_subset=32", "--batch_size=16",
        "--batch_size_eval=16", "--nb_epochs_rat=0.5", "--uql_quant_epochs=1.5", "--summ_step=1",
        "--lrn_rate_init=0.02", "--uql_activation_bits=8"]
TOTAL = 12
STOP_LINE = re.compile(r"^stopped by (SIGTERM|SIGINT) (.+); (.+); run the same command to resume$")


def _interrupt(cwd, wait_for, signum, pause_at=None):
    """Run the script until a stdout line matches `wait_for`, send `signum`; returns (status, stdout, stderr)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    env.pop(stopping.PAUSE_ENV, None)
    if pause_at:
        env[stopping.PAUSE_ENV] = pause_at
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "nets", SCRIPT)] + ARGS, cwd=str(cwd), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.time() + 300
        for line in process.stdout:
            lines.append(line)
            if re.search(wait_for, line):
                process.send_signal(signum)
                break
            assert time.time() < deadline, "no line matching %r after 300 s" % wait_for
        else:
            pytest.fail("the run ended before %r: %s" % (wait_for, process.stderr.read()[-2000:]))
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, "".join(lines) + out, err


def _stop_line(status, err, signum):
    assert status == 128 + signum, (status, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-2000:]
    match = STOP_LINE.match(lines[0])
    assert match and match.group(1) == signal.Signals(signum).name, lines[0]
    return match.group(2), match.group(3)


def _values(checkpoint):
    reader = tf.train.load_checkpoint(checkpoint)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _assert_checkpoint(checkpoint, step):
    values = _values(checkpoint)
    assert int(values["global_step"]) == step
    for name, value in values.items():
        if np.asarray(value).dtype.kind == "f":  # the decisions record is a string
            assert np.all(np.isfinite(value)), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    result = run_script(SCRIPT, ARGS, str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def test_stops_at_every_point_then_resumes_to_the_uninterrupted_result(reference, tmp_path):
    models, quant = tmp_path / "models", tmp_path / "models_uql"
    # 1. Ctrl-C mid-epoch in the float phase: a checkpoint at the current step.
    status, out, err = _interrupt(tmp_path, r"^full-prec iter 3/%d" % TOTAL, signal.SIGINT)
    where, saved = _stop_line(status, err, signal.SIGINT)
    step = int(re.match(r"at step (\d+)$", where).group(1))
    assert 3 <= step < 8  # mid-epoch: before the epoch-end checkpoint at 8
    assert saved == "saved %s-%d" % (models / "model.ckpt", step)
    _assert_checkpoint(str(models / ("model.ckpt-%d" % step)), step)

    # 2. SIGTERM while the epoch-end checkpoint (step 8) is being saved: the save completes, the run stops.
    status, out, err = _interrupt(tmp_path, r"^pause: save$", signal.SIGTERM, pause_at="save")
    assert "full-prec: resuming from %s-%d at step %d of %d" % (models / "model.ckpt", step, step, TOTAL) in out
    assert _stop_line(status, err, signal.SIGTERM) == ("at step 8", "saved %s-8" % (models / "model.ckpt"))
    _assert_checkpoint(str(models / "model.ckpt-8"), 8)

    # 3. Between the float and the quantized phases.
    status, out, err = _interrupt(tmp_path, r"^pause: between_phases$", signal.SIGTERM, pause_at="between_phases")
    where, saved = _stop_line(status, err, signal.SIGTERM)
    assert (where, saved) == ("between the float and quantized phases",
                              "float checkpoint %s-%d saved" % (models / "model.ckpt", TOTAL))
    assert not list(quant.glob("*.index"))

    # 4. During the evaluation of the float model.
    status, out, err = _interrupt(tmp_path, r"^pause: evaluation$", signal.SIGINT, pause_at="evaluation")
    assert _stop_line(status, err, signal.SIGINT) == ("during evaluation", "saved checkpoints are kept")
    assert "uniform iter" not in out

    # 5. While the report is written: it is complete JSON, and the rerun goes on.
    status, out, err = _interrupt(tmp_path, r"^pause: report$", signal.SIGTERM, pause_at="report")
    where, _ = _stop_line(status, err, signal.SIGTERM)
    assert where == "after writing %s" % (quant / "quant_report.json")
    assert json.load(open(quant / "quant_report.json"))["layers"]

    # 6. Mid-epoch in the quantized phase.
    status, out, err = _interrupt(tmp_path, r"^uniform iter 2/%d" % TOTAL, signal.SIGTERM)
    where, saved = _stop_line(status, err, signal.SIGTERM)
    quant_step = int(re.match(r"at step (\d+)$", where).group(1))
    assert 2 <= quant_step < TOTAL and saved == "saved %s-%d" % (quant / "model.ckpt", quant_step)
    _assert_checkpoint(str(quant / ("model.ckpt-%d" % quant_step)), quant_step)

    # The same command completes, and equals the uninterrupted run.
    result = run_script(SCRIPT, ARGS, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "uniform: resuming from %s-%d at step %d" % (quant / "model.ckpt", quant_step, quant_step) in result.stdout
    for directory in ("models", "models_uql"):
        got = _values(str(tmp_path / directory / ("model.ckpt-%d" % TOTAL)))
        want = _values(str(reference / directory / ("model.ckpt-%d" % TOTAL)))
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    got, want = (json.load(open(d / "models_uql" / "results.json")) for d in (tmp_path, reference))
    assert (got["float_accuracy"], got["quant_accuracy"]) == (want["float_accuracy"], want["quant_accuracy"])
