"""Every write path fails clean: summaries on a full disk cost no checkpoint and end in one line naming the file;
exports name the path the user gave and the reason in words; low free space is warned about at the start."""
import errno
import os
import subprocess
import types

import numpy as np
import pytest
import tensorflow as tf

from learners import full_precision, summaries, training
from learners.errors import UserError
from tests.learners.test_reliability import _toy_model
from tests.learners.test_reliability_data import _checkpoint, _Linear
from tfquant import checkpoints
from tfquant.export import run_directory

tf1 = tf.compat.v1


@pytest.fixture
def full_disk(tmp_path):
    """A full 64 KiB tmpfs: files can be created, not written (needs root; skipped where mount is refused)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("a small tmpfs cannot be mounted here (needs root)")
    try:
        with open(mount / "filler", "wb") as filler:
            filler.write(b"\0" * (64 * 1024))
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _train_toy(tmp_path, writer, save_step=4):
    model = _toy_model(lambda v: v + 1.0, lambda a, b: tf.reduce_sum(a) * 0.0 + 1.0)
    with tf1.Session(graph=model.graph) as sess:
        sess.run(model.init_op)
        try:
            return training.run_training(sess, model, str(tmp_path / "ckpt" / "model.ckpt"), writer, 1, save_step,
                                         1, "toy")
        finally:
            writer.close()


def test_summaries_on_a_full_disk_keep_the_checkpoint_and_say_why(tmp_path, full_disk):
    writer = summaries.SummaryWriter(str(full_disk / "logs"), tf.Graph())
    with pytest.raises(summaries.SummaryWriteError) as caught:
        _train_toy(tmp_path, writer)
    prefix = tmp_path / "ckpt" / "model.ckpt"
    # The first save (step 4) comes first; the event file's failure is found right after it.
    assert str(caught.value) == ("TensorBoard event file %s cannot be written (No space left on device); expected a "
                                 "writable --log_dir with free space; the checkpoint %s-4 is saved"
                                 % (writer.path, prefix))
    reader = tf.train.load_checkpoint(str(prefix) + "-4")
    np.testing.assert_array_equal(reader.get_tensor("model/a"), np.full([2], 5.0, np.float32))


def test_summary_flush_that_raises_keeps_the_final_checkpoint(tmp_path, monkeypatch):
    writer = summaries.SummaryWriter(str(tmp_path / "logs"))
    calls = []

    def failing_flush():
        calls.append(1)
        raise RuntimeError("Failed to flush 3 events to %s/events.out: No space left on device" % (tmp_path / "logs"))

    monkeypatch.setattr(writer._writer, "flush", failing_flush)
    with pytest.raises(summaries.SummaryWriteError) as caught:
        _train_toy(tmp_path, writer, save_step=100)  # no save before the final one at step 10
    prefix = tmp_path / "ckpt" / "model.ckpt"
    assert str(caught.value).endswith("(Failed to flush 3 events to %s/events.out: No space left on device); expected "
                                      "a writable --log_dir with free space; the checkpoint %s-10 is saved"
                                      % (tmp_path / "logs", prefix))
    assert calls and checkpoints.latest_valid_checkpoint(str(prefix))[:2] == (str(prefix) + "-10", 10)


def test_summaries_that_fit_are_written_and_read_back(tmp_path):
    writer = summaries.SummaryWriter(str(tmp_path / "logs"), tf.Graph())
    _train_toy(tmp_path, writer)
    assert writer.failure is None
    steps = [event.step for event in tf1.train.summary_iterator(writer.path) if event.summary.value]
    assert steps == list(range(1, 11))


def test_eval_summaries_on_a_full_disk_are_one_line(tmp_path, full_disk):
    images = np.ones((10, 2, 2, 1), np.float32)
    helper = _Linear(images)
    checkpoint = _checkpoint(helper, tmp_path)
    with pytest.raises(summaries.SummaryWriteError) as caught:
        full_precision.evaluate_checkpoint(helper, checkpoint, str(full_disk / "eval"))
    message = str(caught.value)
    assert message.startswith("TensorBoard event file %s" % (full_disk / "eval")) and "No space left on device" in message
    assert message.endswith("checkpoint %s evaluated (accuracy %.4f on 10 test images) but its evaluation is not "
                            "recorded" % (checkpoint, np.mean(np.arange(10) % 3 == 0)))


def test_low_free_space_is_warned_at_the_start(tmp_path, monkeypatch, capsys):
    model = _toy_model(lambda v: v + 1.0, lambda a, b: tf.reduce_sum(a))
    # model/a [2] and model/b [3] float32, global_step int64.
    assert training.checkpoint_bytes(model) == 2 * 4 + 3 * 4 + 8
    monkeypatch.setattr(training.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=55))
    training.warn_if_low_on_space(model, str(tmp_path / "m.ckpt"))
    assert capsys.readouterr().out == ("warning: %s has 0.0 MiB free; a checkpoint takes about 0.0 MiB, so fewer than "
                                       "two more fit (expected free space for at least two checkpoints)\n" % tmp_path)
    monkeypatch.setattr(training.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=56))
    training.warn_if_low_on_space(model, str(tmp_path / "m.ckpt"))
    assert capsys.readouterr().out == ""


# -- exports ------------------------------------------------------------------------------------------------

def test_export_under_a_regular_file_names_it(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(run_directory.ExportError) as caught:
        run_directory.export_run_directory(str(tmp_path), str(tmp_path / "afile" / "out"),
                                           output_name="--output_dir=afile/out")
    assert str(caught.value) == ("--output_dir=afile/out is not valid: %s is a file, not a directory; expected a path "
                                 "whose parents are directories" % (tmp_path / "afile"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_export_write_failure_names_the_users_path_not_the_staging_one(tmp_path, monkeypatch, code):
    def refuse(path, data):
        raise OSError(code, os.strerror(code), path)

    def fake_export(checkpoint_dir, staging, *args):
        run_directory.files.write_atomically(os.path.join(staging, "model.tfq"), b"x")

    monkeypatch.setattr(run_directory.files, "write_atomically", refuse)
    monkeypatch.setattr(run_directory, "_export", fake_export)
    (tmp_path / "run").mkdir()
    with pytest.raises(run_directory.ExportError) as caught:
        run_directory.export_run_directory(str(tmp_path / "run"), str(tmp_path / "out"),
                                           output_name="--output_dir=out")
    assert str(caught.value) == ("--output_dir=out cannot be written (%s: %s); expected a writable directory with "
                                 "free space" % (os.strerror(code), tmp_path / "out" / "model.tfq"))
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no staging directory left behind


def test_export_to_a_read_only_place_names_the_output_directory(tmp_path, monkeypatch):
    def read_only(suffix=None, prefix=None, dir=None):  # pylint: disable=redefined-builtin
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, prefix + "abc123"))

    monkeypatch.setattr(run_directory.staged_directory.tempfile, "mkdtemp", read_only)
    (tmp_path / "run").mkdir()
    with pytest.raises(run_directory.ExportError) as caught:
        run_directory.export_run_directory(str(tmp_path / "run"), str(tmp_path / "out"),
                                           output_name="--output_dir=out")
    assert str(caught.value) == ("--output_dir=out cannot be written (Read-only file system); expected a writable "
                                 "directory with free space")


def test_atomic_write_failure_names_the_file_not_its_temporary(tmp_path, full_disk):
    from tfquant import files
    with pytest.raises(OSError) as caught:
        files.write_atomically(str(full_disk / "report.json"), b"x" * 200000)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(full_disk / "report.json")
    assert sorted(os.listdir(full_disk)) == ["filler"]


def test_export_of_a_locked_run_directory_is_refused(tmp_path):
    from tfquant import files
    import subprocess as sp
    import sys
    from tests.learners.test_end_to_end import ROOT
    holder = sp.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, %r); from tfquant import files; "
                       "files.lock_directory(%r); print('held', flush=True); time.sleep(600)" % (ROOT, str(tmp_path))],
                      stdout=sp.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run_directory.ExportError) as caught:
            run_directory.export_run_directory(str(tmp_path), str(tmp_path.parent / (tmp_path.name + "_out")))
        assert str(caught.value) == ("checkpoint_dir=%s is in use by process %d (lock %s); expected one process per "
                                     "run directory: wait for it to end"
                                     % (tmp_path, holder.pid, tmp_path / files.LOCK_NAME))
    finally:
        holder.kill()
        holder.wait()


def test_run_with_log_dir_on_a_full_disk_saves_then_stops_with_one_line(tmp_path, full_disk):
    from tests.learners.test_end_to_end import run_script
    from tests.learners.test_reliability import FLOAT, SCRIPT
    result = run_script(SCRIPT, FLOAT + ["--log_dir=%s" % (full_disk / "logs")], str(tmp_path))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "EventFileWriter" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    prefix = tmp_path / "models" / "model.ckpt"
    assert len(lines) == 1 and lines[0].startswith("error: TensorBoard event file %s/" % (full_disk / "logs"
                                                                                        / "full-prec" / "train"))
    assert lines[0].endswith("cannot be written (No space left on device); expected a writable --log_dir with free "
                             "space; the checkpoint %s-5 is saved" % prefix), lines[0]
    assert checkpoints.latest_valid_checkpoint(str(prefix))[:2] == (str(prefix) + "-5", 5)


def test_log_dir_check_quotes_the_value_given(tmp_path, monkeypatch):
    from learners import flags as learner_flags
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    learner_flags.define_flags()
    try:
        learner_flags.FLAGS(["run", "--log_dir=afile/logs"])
        with pytest.raises(UserError) as caught:
            learner_flags.validate_flags()
    finally:
        learner_flags.FLAGS.unparse_flags()
    assert str(caught.value) == ("--log_dir=afile/logs is not valid; expected a path in a writable directory (%s is "
                                 "not)" % (tmp_path / "afile"))
