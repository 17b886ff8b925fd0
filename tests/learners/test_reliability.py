"""Reliability: resuming after kill -9, falling back past a damaged checkpoint, stopping on NaN/Inf,
and refusing checkpoints and reports of another model.

Resumed runs are compared with uninterrupted ones for exact equality. That holds because the training
stream is a pure function of (seed, batch position): the shuffle is seeded, augmentation uses stateless
per-batch seeds, and the CPU kernels of these small models are deterministic at a fixed thread count.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from learners import graphs, training, uniform_quant
from learners.errors import UserError
from nets.data import pipeline
from tfquant import checkpoints
from tests.learners.test_end_to_end import ROOT, run_script

tf1 = tf.compat.v1

# 256 images / 32 per batch with nb_epochs_rat=0.83 (x 3 base epochs): 20 float iterations; 20 quantized.
FLOAT = ["--learner=full-prec", "--train_subset=256", "--eval_subset=64", "--batch_size=32", "--batch_size_eval=64",
         "--nb_epochs_rat=0.83", "--summ_step=5", "--save_step=5", "--lrn_rate_init=0.01"]
UNIFORM = ["--learner=uniform" if a == "--learner=full-prec" else a for a in FLOAT] + [
    "--uql_quant_epochs=2.5", "--uql_activation_bits=8", "--uql_weight_overrides=nomatch.*=2"]
SCRIPT = "convnet_at_fmnist_run.py"
TOTAL = 20


def _run_until_checkpoint(args, cwd, directory):
    """Start the run script, SIGKILL it as soon as `directory` holds a checkpoint; returns (step, stdout)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    log_path = os.path.join(cwd, "killed_run.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "nets", SCRIPT)] + args, cwd=cwd, env=env,
                                   stdout=log, stderr=subprocess.DEVNULL)
        state = os.path.join(cwd, directory, "checkpoint")
        deadline = time.time() + 300
        try:
            while not os.path.exists(state):
                assert process.poll() is None, "the run ended (status %s) before a checkpoint" % process.returncode
                assert time.time() < deadline, "no checkpoint after 300 s"
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    step = int(tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(cwd, directory)))
               .get_tensor("global_step"))
    assert 0 < step < TOTAL, step
    with open(log_path) as log:
        return step, log.read()


def _values(directory):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(directory)))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _assert_same_values(directory, reference):
    got, want = _values(directory), _values(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _error_line(result):
    """The runner's one 'error: ...' line (TensorFlow may add deprecation warnings around it)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _copy(source, target):
    shutil.copytree(str(source), str(target))
    return target


@pytest.fixture(scope="module")
def float_reference(tmp_path_factory):
    """An uninterrupted 20-iteration float run, saving every 5 (ckpt-10, -15, -20 kept)."""
    cwd = tmp_path_factory.mktemp("float_reference")
    result = run_script(SCRIPT, FLOAT, str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


@pytest.fixture(scope="module")
def uniform_reference(float_reference, tmp_path_factory):
    """An uninterrupted uniform run: the float phase is the float reference (same flags), then quantized."""
    cwd = _copy(float_reference, tmp_path_factory.mktemp("uniform") / "run")
    result = run_script(SCRIPT, UNIFORM, str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


# -- resuming --------------------------------------------------------------------------------------------

def test_full_prec_resumes_after_kill(float_reference, tmp_path):
    killed_at, _ = _run_until_checkpoint(FLOAT, str(tmp_path), "models")
    result = run_script(SCRIPT, FLOAT, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = re.findall(r"full-prec: resuming from \S+model\.ckpt-(\d+) at step (\d+) of (\d+)", result.stdout)
    assert resumed == [(str(killed_at), str(killed_at), str(TOTAL))], result.stdout
    assert "full-prec iter %d/%d" % (TOTAL, TOTAL) in result.stdout
    assert min(int(i) for i in re.findall(r"full-prec iter (\d+)/", result.stdout)) > killed_at
    values = _values(tmp_path / "models")
    assert values["global_step"] == TOTAL
    _assert_same_values(tmp_path / "models", float_reference / "models")


def test_uniform_resumes_float_phase_then_quant_phase(float_reference, uniform_reference, tmp_path):
    cwd = str(tmp_path)
    float_killed, _ = _run_until_checkpoint(UNIFORM, cwd, "models")
    assert not glob.glob(str(tmp_path / "models_uql" / "*.index"))  # only its settings record so far
    quant_killed, out = _run_until_checkpoint(UNIFORM, cwd, "models_uql")
    # The second run finished the float phase it resumed (saying so once), then was killed while quantizing.
    assert re.findall(r"full-prec: resuming from \S+model\.ckpt-(\d+) at step (\d+) of (\d+)", out) == [
        (str(float_killed), str(float_killed), str(TOTAL))], out
    assert "no float checkpoint" not in out and "full-prec iter 1/" not in out
    assert int(_values(tmp_path / "models")["global_step"]) == TOTAL
    _assert_same_values(tmp_path / "models", float_reference / "models")
    result = run_script(SCRIPT, UNIFORM, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.findall(r"uniform: resuming from \S+model\.ckpt-(\d+) at step (\d+) of (\d+)", result.stdout) == [
        (str(quant_killed), str(quant_killed), str(TOTAL))], result.stdout
    assert "full-prec: resuming" not in result.stdout
    assert min(int(i) for i in re.findall(r"uniform iter (\d+)/", result.stdout)) > quant_killed
    values = _values(tmp_path / "models_uql")
    assert values["global_step"] == TOTAL
    assert any(name.endswith("act_quant/ema_min") for name in values)  # moving-average ranges came back too
    _assert_same_values(tmp_path / "models_uql", uniform_reference[0] / "models_uql")


def test_dataset_skip_gives_the_same_batches():
    images = (np.arange(20 * 4 * 4, dtype=np.int64).reshape(20, 4, 4) % 251).astype(np.uint8)
    labels = np.arange(20) % 10

    def batches(skip, count):
        with tf.Graph().as_default():
            ds = pipeline.make_train_dataset(images, labels, 4, pipeline.fmnist_train_preprocess, seed=3,
                                             skip_batches=skip)
            x, y = tf1.data.make_one_shot_iterator(ds).get_next()
            with tf1.Session() as sess:
                return [sess.run([x, y]) for _ in range(count)]

    full = batches(0, 9)
    resumed = batches(6, 3)  # 5 batches per epoch: the skip crosses a reshuffle
    for (x, y), (rx, ry) in zip(full[6:], resumed):
        np.testing.assert_array_equal(rx, x)  # flips included: they depend on the batch position only
        np.testing.assert_array_equal(ry, y)
    assert not np.array_equal(resumed[0][0], full[0][0])


# -- checkpoints ----------------------------------------------------------------------------------------

def test_truncated_latest_checkpoint_falls_back(float_reference, tmp_path):
    cwd = _copy(float_reference, tmp_path / "run")
    data = cwd / "models" / "model.ckpt-20.data-00000-of-00001"
    with open(data, "r+b") as handle:
        handle.truncate(os.path.getsize(data) // 2)
    result = run_script(SCRIPT, FLOAT, str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"full-prec: checkpoint \S+model\.ckpt-20 cannot be restored \(.+\); falling back to the "
                     r"previous one \S+model\.ckpt-15", result.stdout), result.stdout
    assert re.search(r"full-prec: resuming from \S+model\.ckpt-15 at step 15 of %d" % TOTAL, result.stdout)
    _assert_same_values(cwd / "models", float_reference / "models")


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(float_reference, tmp_path):
    directory = _copy(float_reference / "models", tmp_path / "models")
    for step in (10, 15, 20):
        with open(directory / ("model.ckpt-%d.data-00000-of-00001" % step), "r+b") as handle:
            handle.truncate(100)
    with pytest.raises(UserError, match=r"no checkpoint of \S+model\.ckpt can be restored: \S+model\.ckpt-20 \("):
        training.find_checkpoint(str(directory / "model.ckpt"), "full-prec")
    # A lost state file does not hide the checkpoints on disk either.
    os.remove(directory / "checkpoint")
    assert checkpoints.list_checkpoints(str(directory / "model.ckpt"))[0][0].endswith("model.ckpt-20")


# -- divergence -------------------------------------------------------------------------------------------

def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(float_reference, tmp_path):
    cwd = _copy(float_reference, tmp_path / "run")
    # Resume the finished 20-iteration run into a 40-iteration one with an absurd learning rate; without
    # its settings record (as written before records existed) the run adopts the checkpoints when asked to.
    os.remove(cwd / "models" / "model.ckpt.settings.json")
    args = [a for a in FLOAT if not a.startswith(("--nb_epochs_rat", "--lrn_rate_init", "--save_step"))]
    result = run_script(SCRIPT, args + ["--nb_epochs_rat=1.66", "--lrn_rate_init=1e30", "--save_step=1",
                                        "--adopt_checkpoints"], str(cwd))
    line = _error_line(result)
    match = re.match(r"error: training diverged at step (\d+): (loss is (nan|inf)|variable model/\S+ holds (nan|inf) "
                     r"values); the last good checkpoint (\S+) is kept$", line)
    assert match, line
    step, kept = int(match.group(1)), match.group(5)
    assert step > TOTAL
    latest = tf.train.latest_checkpoint(str(cwd / "models"))
    assert os.path.normpath(os.path.join(str(cwd), kept)) == latest
    assert int(latest.rsplit("-", 1)[1]) < step
    for name, value in _values(cwd / "models").items():
        assert np.all(np.isfinite(value)), name


def _toy_model(update, loss_of):
    """A ModelGraph around two variables, updated by `update(var)` each step; loss_of(a, b) before it."""
    graph = tf.Graph()
    with graph.as_default():
        a = tf1.get_variable("model/a", initializer=tf.ones([2]))
        b = tf1.get_variable("model/b", initializer=tf.ones([3]))
        step = tf1.train.get_or_create_global_step()
        loss = loss_of(a.read_value(), b.read_value())
        with tf.control_dependencies([loss]):
            train_op = tf.group(a.assign(update(a)), b.assign(update(b)), step.assign_add(1))
        flags, names = graphs.finite_check(graph)
        model = graphs.ModelGraph(graph=graph, is_train=True, loss=loss, accuracy=tf.constant(0.0),
                                  batch_count=tf.constant(1), model_variables=[a, b], saver=tf1.train.Saver(),
                                  init_op=tf1.global_variables_initializer(), train_op=train_op, global_step=step,
                                  lrn_rate=tf.constant(0.1), nb_iters=10, summary_op=tf1.summary.merge(
                                      [tf1.summary.scalar("loss", loss)]),
                                  finite_flags=flags, checked_variable_names=names)
    return model


def _train_toy(model, tmp_path, save_step, last_good=None):
    with tf1.Session(graph=model.graph) as sess:
        sess.run(model.init_op)
        writer = tf1.summary.FileWriter(str(tmp_path / "logs"))
        try:
            training.run_training(sess, model, str(tmp_path / "ckpt" / "model.ckpt"), writer, 100, save_step, 1,
                                  "toy", last_good=last_good)
        finally:
            writer.close()


def test_non_finite_loss_stops_at_its_step(tmp_path):
    model = _toy_model(lambda v: v * 1e20, lambda a, b: tf.reduce_sum(a) * tf.reduce_sum(b) * 1e-3)
    # Losses 0.006, 6e37, then inf at step 3: the weights (1e40 overflow) are never saved.
    with pytest.raises(training.TrainingDiverged, match=r"^training diverged at step 3: loss is inf; the last good "
                                                        r"checkpoint before/model.ckpt-0 is kept$"):
        _train_toy(model, tmp_path, save_step=100, last_good="before/model.ckpt-0")


def test_non_finite_variable_is_never_saved(tmp_path):
    model = _toy_model(lambda v: v * 1e30, lambda a, b: tf.reduce_sum(a) * 0.0 + 1.0)
    # Step 1 saves finite 1e30 weights; step 2 overflows both variables; the first by name is named.
    with pytest.raises(training.TrainingDiverged, match=r"^training diverged at step 2: variable model/a holds inf "
                                                        r"values; the last good checkpoint \S+model.ckpt-1 is kept$"):
        _train_toy(model, tmp_path, save_step=1)
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")).endswith("model.ckpt-1")


# -- checkpoints and reports of another model -------------------------------------------------------------

def test_checkpoint_of_another_model_is_refused(float_reference, tmp_path):
    _copy(float_reference / "models", tmp_path / "models")
    # A ConvNet checkpoint where the ResNet run looks for its float model: its settings record says so first.
    result = run_script("resnet_at_fmnist_run.py", UNIFORM + ["--resnet_size=20"], str(tmp_path))
    assert "model convnet (recorded) vs resnet_20 (now)" in _error_line(result)
    # Without the record (a directory from before records existed), adopted on request, the checkpoint itself is
    # refused.
    os.remove(tmp_path / "models" / "model.ckpt.settings.json")
    result = run_script("resnet_at_fmnist_run.py", UNIFORM + ["--resnet_size=20", "--adopt_checkpoints"],
                        str(tmp_path))
    line = _error_line(result)
    assert re.match(r"error: checkpoint \S+model\.ckpt-20 has no variable model/\S+; expected a checkpoint of this "
                    r"model$", line), line
    assert not glob.glob(str(tmp_path / "models_uql" / "*.index"))


def test_checkpoint_with_a_wrong_shape_is_refused(float_reference, tmp_path):
    values = _values(float_reference / "models")
    with tf.Graph().as_default():
        variables = [tf1.get_variable(name, initializer=value[:, :5] if name == "model/fc4/weights" else value)
                     for name, value in sorted(values.items())]
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            tf1.train.Saver(variables).save(sess, str(tmp_path / "models" / "model.ckpt"), global_step=TOTAL)
    result = run_script(SCRIPT, FLOAT + ["--exec_mode=eval"], str(tmp_path))
    line = _error_line(result)
    assert re.match(r"error: checkpoint \S+model\.ckpt-20: variable model/fc4/weights has shape \[1024, 5\], the model "
                    r"expects \[1024, 10\]$", line), line


def test_report_of_another_model_is_refused_by_eval(uniform_reference, tmp_path):
    cwd = _copy(uniform_reference[0], tmp_path / "run")
    path = cwd / "models_uql" / "quant_report.json"
    report = json.load(open(path))
    weights = [layer for layer in report["layers"] if layer["kind"] == "weight"]
    assert weights[1]["weight_variable"] == "model/conv2/weights" and weights[1]["shape"] == [5, 5, 32, 64]
    weights[1]["shape"] = [3, 3, 32, 64]
    # Kept self-consistent, or the report schema refuses the file before the model is compared.
    weights[1]["num_params"] = 3 * 3 * 32 * 64
    weights[1]["weight_storage_bits"] = weights[1]["num_params"] * weights[1]["bits"]
    with open(path, "w") as handle:
        json.dump(report, handle)
    line = _error_line(run_script(SCRIPT, UNIFORM + ["--exec_mode=eval"], str(cwd)))
    # The checkpoint records the decisions it was trained with, so the edited shape is caught against it.
    assert re.match(r"error: quantization report \S+quant_report\.json does not match this checkpoint's model: layer 1 "
                    r"\(model/conv2/Conv2D\) has shape \[3, 3, 32, 64\] in the report, \[5, 5, 32, 64\] in the "
                    r"checkpoint; expected the report written with checkpoint \S+model\.ckpt-\d+$", line), line


def test_report_with_other_layers_is_refused(uniform_reference):
    import tfquant
    saved = tfquant.QuantReport.from_json(open(uniform_reference[0] / "models_uql" / "quant_report.json").read())
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 8])
        tf.matmul(x, tf1.get_variable("other/weights", [8, 3]))
        other = tfquant.quantize_graph(graph, tfquant.QuantConfig(quantize_all_layers=True), is_training=False)
    with pytest.raises(UserError, match=r"weight layer 0 is model/conv1/weights with shape \[5, 5, 1, 32\] in the "
                                        r"report, other/weights with shape \[8, 3\] in this model"):
        uniform_quant.check_report_matches(saved, other, "r.json")
    uniform_quant.check_report_matches(saved, saved, "r.json")


def test_unused_override_is_reported(uniform_reference):
    _, result = uniform_reference
    assert "note: weight override 'nomatch.*' matched no layer" in result.stdout


def _ancestors(op):
    """Every op `op` waits for, through data and control inputs."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def test_first_activation_range_update_is_ordered():
    """Resumed and uninterrupted quantized runs can only agree if the range update is deterministic.

    The first update copies the batch range when ema_steps reads 0; the read of ema_steps must therefore
    happen before ema_steps is incremented in the same step, or the moving average may start from 0 with
    weight `decay` (seen here as ema_max 0.79 instead of 3.63 after 20 steps of a resumed run).
    """
    from tfquant import ranges
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [4])
        _, tracker = ranges.quantize_activation(tf.nn.relu(x), 8, "ema", True, 0.99, "r")
    steps = tracker.ema_steps.handle.op
    increments = [op for op in graph.get_operations()
                  if op.type == "AssignAddVariableOp" and op.inputs[0].op is steps]
    reads = [op for op in graph.get_operations() if op.type == "ReadVariableOp" and op.inputs[0].op is steps
             and any(c.type != "Identity" for t in op.outputs for c in t.consumers())]
    assert len(increments) == 1 and reads
    for read in reads:
        assert read in _ancestors(increments[0]), "ema_steps is read (%s) unordered with its increment (%s)" % (
            read.name, increments[0].name)


def test_report_of_a_run_quantizing_fewer_tensors_names_the_new_one(tmp_path):
    """A run trained when --uql_quantize_layer_outputs did not yet cover the mean the fc reads: eval and export
    name the tensor the rebuilt model quantizes and the report lacks."""
    import tfquant
    from tfquant.export import model_export

    def build(with_mean_read_by_fc):
        graph = tf.Graph()
        with graph.as_default():
            x = tf1.placeholder(tf.float32, [None, 4, 4, 2])
            y = tf.nn.relu(tf.nn.conv2d(x, tf1.get_variable("conv/weights", [3, 3, 2, 3]), 1, "SAME"))
            pooled = tf.reduce_mean(y, [1, 2])
            if not with_mean_read_by_fc:
                pooled = tf.identity(pooled * 1.0)  # a Mul between: not an average the fc reads
            tf.matmul(pooled, tf1.get_variable("fc/weights", [3, 2]))
            config = tfquant.QuantConfig(quantize_all_layers=True, quantize_layer_outputs=True)
            return tfquant.quantize_graph(graph, config, is_training=False)

    saved, rebuilt = build(False), build(True)
    with pytest.raises(UserError, match=r"quantization report r\.json does not match this checkpoint's model: the "
                                        r"model rebuilt from it also quantizes Mean, which the report does not list"):
        uniform_quant.check_report_matches(saved, rebuilt, "r.json")
    with pytest.raises(model_export.ExportError, match=r"report r\.json does not match the model: the model rebuilt "
                                                       r"from it also quantizes Mean"):
        model_export.check_report_matches_model(saved, rebuilt, "r.json")
