"""One process per run directory: a second run is refused at once, the first goes on; a dead holder never blocks;
checkpoints without a settings record are adopted only on request."""
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest
import tensorflow as tf

from learners import flags as learner_flags
from learners import full_precision, run_settings, stopping
from learners.errors import UserError
from tests.learners.test_end_to_end import ROOT
from tests.learners.test_reliability import FLOAT, SCRIPT, UNIFORM, _error_line
from tfquant import files


def _start(args, cwd, env_extra=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, **(env_extra or {}))
    env.pop(stopping.PAUSE_ENV, None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "nets", SCRIPT)] + args, cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(process, pattern, timeout=300):
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError("the run ended before %r: %s %s" % (pattern, lines[-20:], process.stderr.read()))
        lines.append(line.rstrip("\n"))
        if re.match(pattern, lines[-1]):
            return lines
    raise AssertionError("no %r within %d s" % (pattern, timeout))


def _finish(process, resume):
    """Let a run paused at a test pause point go on; returns its stdout once it ended with status 0."""
    resume.touch()
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out


def _in_use_line(directory, pid):
    return ("error: run directory %s is in use by process %d (lock %s); expected one process per run directory: "
            "wait for it to end, or choose another --save_path / --uql_save_quant_model_path"
            % (directory, pid, directory / files.LOCK_NAME))


def test_second_run_on_a_directory_is_refused_and_the_first_finishes(tmp_path):
    resume = tmp_path / "resume"
    first = _start(FLOAT, str(tmp_path), {stopping.PAUSE_ENV: "save", stopping.RESUME_FILE_ENV: str(resume)})
    try:
        before = _wait_for_line(first, r"^pause: save$")  # in its first save, holding the directory
        listing = sorted(os.listdir(tmp_path / "models"))
        started = time.time()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
        env.pop(stopping.PAUSE_ENV, None)
        second = subprocess.run([sys.executable, os.path.join(ROOT, "nets", SCRIPT)] + FLOAT, cwd=str(tmp_path),
                                env=env, capture_output=True, text=True, timeout=120)
        refused_after = time.time() - started
        assert _error_line(second) == _in_use_line(tmp_path / "models", first.pid)
        assert "iter" not in second.stdout  # it never trained
        assert sorted(os.listdir(tmp_path / "models")) == listing  # and wrote nothing
        # The start-up every run pays (Python, TensorFlow), from a run refused by its first flag check.
        started = time.time()
        baseline = subprocess.run([sys.executable, os.path.join(ROOT, "nets", SCRIPT), "--batch_size=0"],
                                  cwd=str(tmp_path / "models"), env=env, capture_output=True, text=True, timeout=120)
        startup = time.time() - started
        assert _error_line(baseline).startswith("error: --batch_size=0 is not valid")
        print("\nsecond process refused %.2f s after it started (before TensorFlow's import); a run stopped by its "
              "first flag check (after the import) takes %.2f s" % (refused_after, startup))
        out = _finish(first, resume)
    finally:
        first.kill()
        first.wait()
    lines = before + out.splitlines()
    assert any(re.match(r"^full-prec iter 20/20 ", line) for line in lines), lines[-10:]
    assert any(line.endswith("full-prec: saved %s" % (tmp_path / "models" / "model.ckpt-20")) for line in lines)
    reader = tf.train.load_checkpoint(str(tmp_path / "models" / "model.ckpt-20"))
    assert int(reader.get_tensor("global_step")) == 20


def test_lock_of_a_killed_process_never_blocks(tmp_path):
    # A process takes the lock and is killed with SIGKILL: its lock file stays, with its pid, and blocks nobody.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, %r); "
                               "from tfquant import files; files.lock_directory(%r); print('held', flush=True); "
                               "time.sleep(600)" % (ROOT, str(tmp_path))],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(files.DirectoryInUse) as caught:
            files.lock_directory(str(tmp_path))
        assert caught.value.pid == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / files.LOCK_NAME).read_text().strip() == str(holder.pid)  # stale
    try:
        files.lock_directory(str(tmp_path))
        assert (tmp_path / files.LOCK_NAME).read_text().strip() == str(os.getpid())
        files.lock_directory(str(tmp_path))  # again: this process holds it already
    finally:
        files.release_directory(str(tmp_path))


def _helper():
    return types.SimpleNamespace(model_name="convnet", dataset_name="fmnist", lrn_rate_init=0.01, loss_w_dcy=0.0)


def _settings(**extra):
    values = dict(batch_size=32, nb_epochs_rat=1.0, momentum=0.9, seed=0, train_subset=None, save_path=None)
    values.update(extra)
    return types.SimpleNamespace(**values)


def test_checkpoints_without_a_settings_record_are_adopted_only_on_request(tmp_path):
    models = tmp_path / "models"
    prefix = str(models / "model.ckpt")
    with tf.Graph().as_default():
        step = tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver([step])
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, prefix, global_step=7, write_meta_graph=False)
    learner = full_precision.FullPrecLearner(_helper(), _settings(save_path=prefix))
    with pytest.raises(run_settings.SettingsError) as caught:
        learner.check_settings()
    assert str(caught.value) == (
        "checkpoint %s-7 has no settings record %s, so the settings it was trained with are unknown; expected a "
        "record beside every checkpoint (to resume these checkpoints with the current settings, rerun with "
        "--adopt_checkpoints; to start afresh, delete or move %s)" % (prefix, prefix + ".settings.json", models))
    # --adopt_checkpoints: the current settings are taken as theirs; a record, once written, is compared as usual.
    adopting = full_precision.FullPrecLearner(_helper(), _settings(save_path=prefix, adopt_checkpoints=True))
    current = adopting.check_settings()
    assert current["batch_size"] == 32 and current["model"] == "convnet"
    run_settings.write_record(prefix, "full-prec", current)
    files.release_directory(str(models))
    changed = full_precision.FullPrecLearner(_helper(), _settings(save_path=prefix, batch_size=64))
    with pytest.raises(run_settings.SettingsError, match=r"--batch_size 32 \(recorded\) vs 64 \(now\)"):
        changed.check_settings()
    # Without checkpoints there is nothing to adopt: a fresh directory needs no flag.
    fresh = full_precision.FullPrecLearner(_helper(), _settings(save_path=str(tmp_path / "new" / "model.ckpt")))
    assert fresh.check_settings()["seed"] == 0


def test_adopt_checkpoints_is_a_flag_of_training():
    learner_flags.define_flags()
    try:
        learner_flags.FLAGS(["run", "--adopt_checkpoints"])
        learner_flags.validate_flags()
        assert learner_flags.FLAGS.adopt_checkpoints is True
        learner_flags.FLAGS.unparse_flags()
        learner_flags.FLAGS(["run", "--adopt_checkpoints", "--exec_mode=eval"])
        with pytest.raises(UserError, match=r"^--adopt_checkpoints=True has no effect without --exec_mode=train"):
            learner_flags.validate_flags()
    finally:
        learner_flags.FLAGS.unparse_flags()


# -- readers share a finished float model --------------------------------------------------------------------

def _hold_in_process(directory, shared):
    """A helper process holding `directory`'s lock (shared or not) until killed; returns it once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, %r); "
                               "from tfquant import files; files.lock_directory(%r, shared=%r); "
                               "print('held', flush=True); time.sleep(600)" % (ROOT, str(directory), shared)],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_shared_locks_coexist_and_keep_an_exclusive_one_out(tmp_path):
    reader = _hold_in_process(tmp_path, shared=True)
    try:
        files.lock_directory(str(tmp_path), shared=True)  # a second reader
        with pytest.raises(files.DirectoryInUse) as caught:
            files.lock_directory(str(tmp_path))  # this process's upgrade to exclusive: the other reader is there
        assert caught.value.pid == reader.pid
        assert files.holds_lock(str(tmp_path))
    finally:
        reader.send_signal(signal.SIGKILL)
        reader.wait()
    try:
        # The failed upgrade kept this process's shared lock: another process still cannot write there.
        attempt = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); from tfquant import files\n"
                                  "try:\n    files.lock_directory(%r)\nexcept files.DirectoryInUse as exc:\n"
                                  "    print('in use by', exc.pid)" % (ROOT, str(tmp_path))],
                                 capture_output=True, text=True, timeout=120)
        assert attempt.stdout.strip() == "in use by %d" % os.getpid(), attempt.stderr[-2000:]
        # Both readers named themselves; the dead one's line blocks nothing.
        assert (tmp_path / files.LOCK_NAME).read_text().split() == [str(reader.pid), str(os.getpid())]
        files.lock_directory(str(tmp_path))  # alone now: the upgrade succeeds and the file names the writer only
        assert (tmp_path / files.LOCK_NAME).read_text().split() == [str(os.getpid())]
        files.lock_directory(str(tmp_path), shared=True)  # already held (exclusively): nothing changes
        assert (tmp_path / files.LOCK_NAME).read_text().split() == [str(os.getpid())]
    finally:
        files.release_directory(str(tmp_path))
    writer = _hold_in_process(tmp_path, shared=False)
    try:
        with pytest.raises(files.DirectoryInUse) as caught:
            files.lock_directory(str(tmp_path), shared=True)  # no reader while a writer holds it
        assert caught.value.pid == writer.pid
        assert not files.holds_lock(str(tmp_path))
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()


def test_fine_tunings_share_a_finished_float_model_and_keep_its_trainer_out(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    env.pop(stopping.PAUSE_ENV, None)
    script = [sys.executable, os.path.join(ROOT, "nets", SCRIPT)]
    trained = subprocess.run(script + FLOAT, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    float_listing = sorted(os.listdir(tmp_path / "models"))
    uniform = ["--learner=uniform" if a == "--learner=full-prec" else a for a in FLOAT] + [
        "--uql_quant_epochs=0.25", "--uql_activation_bits=8"]
    resume = tmp_path / "resume"
    first = _start(uniform + ["--uql_save_quant_model_path=q1/model.ckpt"], str(tmp_path),
                   {stopping.PAUSE_ENV: "between_phases", stopping.RESUME_FILE_ENV: str(resume)})
    try:
        _wait_for_line(first, r"^pause: between_phases$")  # it holds the float directory as a reader
        second = subprocess.run(script + uniform + ["--uql_save_quant_model_path=q2/model.ckpt"], cwd=str(tmp_path),
                                env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        assert tf.train.latest_checkpoint(str(tmp_path / "q2")) is not None
        # Training the float model again would write where the paused run reads: refused, naming the reader.
        refused = subprocess.run(script + FLOAT + ["--nb_epochs_rat=1.0"], cwd=str(tmp_path), env=env,
                                 capture_output=True, text=True, timeout=300)
        assert _error_line(refused) == _in_use_line(tmp_path / "models", first.pid)
        # Its quantized directory stays its own.
        same_quant = subprocess.run(script + uniform + ["--uql_save_quant_model_path=q1/model.ckpt"],
                                    cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
        assert _error_line(same_quant) == _in_use_line(tmp_path / "q1", first.pid)
        _finish(first, resume)
    finally:
        first.kill()
        first.wait()
    assert tf.train.latest_checkpoint(str(tmp_path / "q1")) is not None
    assert sorted(os.listdir(tmp_path / "models")) == float_listing  # the readers wrote nothing there


def test_a_fine_tuning_that_must_train_its_float_model_waits_for_no_reader(tmp_path):
    # The float directory exists without a checkpoint and another process reads it: the run, which would train the
    # float model there first, is refused with the reader's pid before it writes anything.
    (tmp_path / "models").mkdir()
    reader = _hold_in_process(tmp_path / "models", shared=True)
    try:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
        env.pop(stopping.PAUSE_ENV, None)
        result = subprocess.run([sys.executable, os.path.join(ROOT, "nets", SCRIPT)] + UNIFORM, cwd=str(tmp_path),
                                env=env, capture_output=True, text=True, timeout=300)
        assert _error_line(result) == _in_use_line(tmp_path / "models", reader.pid)
        assert sorted(os.listdir(tmp_path / "models")) == [files.LOCK_NAME]
        assert "iter" not in result.stdout
    finally:
        reader.send_signal(signal.SIGKILL)
        reader.wait()
