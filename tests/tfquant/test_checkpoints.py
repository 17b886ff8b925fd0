"""tfquant.checkpoints: discovery per prefix, the state file as advice only, validation, fallback, pruning."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tfquant import checkpoints
from tfquant.export import model_export

tf1 = tf.compat.v1


def _save(prefix, steps, value=1.0, relative=True):
    """Write checkpoints prefix-N for each N with a fresh Saver each (as separate runs do); returns values."""
    written = {}
    for step in steps:
        with tf.Graph().as_default():
            weights = tf1.get_variable("w", initializer=np.full([3], value * step, np.float32))
            global_step = tf1.train.get_or_create_global_step()
            saver = tf1.train.Saver(max_to_keep=0, save_relative_paths=relative)
            with tf1.Session() as sess:
                sess.run(tf1.global_variables_initializer())
                sess.run(global_step.assign(step))
                written[step] = saver.save(sess, str(prefix), global_step=step, write_meta_graph=False)
                np.testing.assert_array_equal(sess.run(weights), np.full([3], value * step, np.float32))
    return written


def _steps(found):
    return [checkpoints.step_of(path) for path in found]


def test_discovery_keeps_only_its_own_prefix(tmp_path):
    _save(tmp_path / "quant.ckpt", [3, 16])
    _save(tmp_path / "float.ckpt", [20, 47])  # saved last: the state file names float.ckpt-47 only
    with open(tmp_path / "checkpoint") as handle:
        assert "float.ckpt-47" in handle.read()
    found, notes = checkpoints.list_checkpoints(str(tmp_path / "quant.ckpt"))
    assert found == [str(tmp_path / "quant.ckpt-16"), str(tmp_path / "quant.ckpt-3")] and notes == []
    assert _steps(checkpoints.list_checkpoints(str(tmp_path / "float.ckpt"))[0]) == [47, 20]
    # A prefix whose name is another's with a suffix is another prefix.
    _save(tmp_path / "quant.ckpt-16x", [99])
    assert _steps(checkpoints.list_checkpoints(str(tmp_path / "quant.ckpt"))[0]) == [16, 3]
    assert checkpoints.list_checkpoints(str(tmp_path / "none.ckpt")) == ([], [])


def test_state_file_entries_outside_the_directory_are_ignored(tmp_path):
    run = tmp_path / "run"
    other = tmp_path / "other"
    _save(run / "model.ckpt", [5])
    _save(other / "model.ckpt", [9])
    for entry in (str(other / "model.ckpt-9"), "../other/model.ckpt-9"):
        with open(run / "checkpoint", "w") as handle:
            handle.write('model_checkpoint_path: "%s"\nall_model_checkpoint_paths: "%s"\n' % (entry, entry))
        found, notes = checkpoints.list_checkpoints(str(run / "model.ckpt"))
        assert found == [str(run / "model.ckpt-5")]
        assert len(notes) == 1 and "outside its directory (first: %s); ignored" % entry in notes[0]
    # An absolute entry naming this very directory counts, by its basename.
    with open(run / "checkpoint", "w") as handle:
        handle.write('model_checkpoint_path: "%s"\n' % (run / "model.ckpt-7"))
    found, notes = checkpoints.list_checkpoints(str(run / "model.ckpt"))
    assert found == [str(run / "model.ckpt-5")]
    assert notes == ["checkpoint state file in %s names model.ckpt-7, whose files are missing; using the "
                     "checkpoints on disk" % run]
    _save(run / "model.ckpt", [7])
    assert checkpoints.list_checkpoints(str(run / "model.ckpt")) == (
        [str(run / "model.ckpt-7"), str(run / "model.ckpt-5")], [])


def test_copied_directory_with_absolute_state_file_reads_only_the_copy(tmp_path):
    original = tmp_path / "original"
    _save(original / "model.ckpt", [4, 8], relative=False)
    with open(original / "checkpoint") as handle:
        assert str(original) in handle.read()  # what TensorFlow writes by default
    copy = tmp_path / "copy"
    shutil.copytree(str(original), str(copy))
    shutil.rmtree(str(original))
    checkpoint, step, notes = checkpoints.latest_valid_checkpoint(str(copy / "model.ckpt"))
    assert (checkpoint, step) == (str(copy / "model.ckpt-8"), 8)
    assert len(notes) == 1 and "outside its directory" in notes[0]
    assert model_export.resolve_checkpoint(str(copy)) == str(copy / "model.ckpt-8")
    # The copy's own files gone: nothing is found (never the original's names).
    for name in os.listdir(str(copy)):
        if name.startswith("model.ckpt-"):
            os.remove(str(copy / name))
    assert checkpoints.latest_valid_checkpoint(str(copy / "model.ckpt"))[:2] == (None, 0)


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"model_checkpoint_path: 12 {{{", b"\x00" * 64,
                                     b"model_checkpoint_path: \"a\"\nunknown_field: \"b\"\n"])
def test_damaged_state_file_is_a_note(tmp_path, content):
    _save(tmp_path / "model.ckpt", [2, 6])
    with open(tmp_path / "checkpoint", "wb") as handle:
        handle.write(content)
    found, notes = checkpoints.list_checkpoints(str(tmp_path / "model.ckpt"))
    assert _steps(found) == [6, 2]
    assert len(notes) == 1 and "using the checkpoint files on disk" in notes[0], notes


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_state_file_that_is_not_a_regular_file_is_a_note(tmp_path, kind):
    _save(tmp_path / "model.ckpt", [2])
    os.remove(tmp_path / "checkpoint")
    if kind == "fifo":
        os.mkfifo(str(tmp_path / "checkpoint"))  # a reader that opened it would block forever
    else:
        os.mkdir(str(tmp_path / "checkpoint"))
    found, notes = checkpoints.list_checkpoints(str(tmp_path / "model.ckpt"))
    assert _steps(found) == [2] and "is a %s" % ("FIFO" if kind == "fifo" else "directory") in notes[0]


def test_fifo_checkpoint_index_is_refused_without_blocking(tmp_path):
    _save(tmp_path / "model.ckpt", [2, 4])
    os.remove(tmp_path / "model.ckpt-4.index")
    os.mkfifo(str(tmp_path / "model.ckpt-4.index"))
    checkpoint, step, notes = checkpoints.latest_valid_checkpoint(str(tmp_path / "model.ckpt"))
    assert (checkpoint, step) == (str(tmp_path / "model.ckpt-2"), 2)
    assert "is a FIFO" in notes[0] and "falling back to the previous one" in notes[0]


def test_fallback_past_several_damaged_checkpoints(tmp_path):
    _save(tmp_path / "model.ckpt", [1, 2, 3])
    _save(tmp_path / "model.ckpt", [4, 5])  # a resumed run: a fresh Saver
    with open(tmp_path / "model.ckpt-5.data-00000-of-00001", "r+b") as handle:
        handle.truncate(3)
    with tf.Graph().as_default():  # step 4 holds a NaN
        tf1.get_variable("w", initializer=np.array([1.0, np.nan, 2.0], np.float32))
        global_step = tf1.train.get_or_create_global_step()
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            sess.run(global_step.assign(4))
            tf1.train.Saver().save(sess, str(tmp_path / "model.ckpt"), global_step=4, write_meta_graph=False)
    checkpoint, step, notes = checkpoints.latest_valid_checkpoint(str(tmp_path / "model.ckpt"))
    assert (checkpoint, step) == (str(tmp_path / "model.ckpt-3"), 3)
    assert len(notes) == 2
    assert notes[0].startswith("checkpoint %s cannot be restored" % (tmp_path / "model.ckpt-5"))
    assert "variable w holds non-finite values" in notes[1]
    for older in (1, 2, 3):
        os.remove(tmp_path / ("model.ckpt-%d.index" % older))
    with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint of \S+model\.ckpt can be restored"):
        checkpoints.latest_valid_checkpoint(str(tmp_path / "model.ckpt"))


def test_pruning_spans_resumed_runs_and_spares_other_prefixes(tmp_path):
    _save(tmp_path / "model.ckpt", [1, 2, 3])
    _save(tmp_path / "model.ckpt", [4, 5])  # a fresh Saver does not know 1..3
    _save(tmp_path / "other.ckpt", [1, 2])
    deleted = checkpoints.prune_checkpoints(str(tmp_path / "model.ckpt"), 3)
    assert _steps(deleted) == [2, 1]
    remaining = sorted(name for name in os.listdir(str(tmp_path)) if name.startswith("model.ckpt-"))
    assert remaining == ["model.ckpt-%d.%s" % (n, ext) for n in (3, 4, 5) for ext in ("data-00000-of-00001", "index")]
    assert _steps(checkpoints.list_checkpoints(str(tmp_path / "other.ckpt"))[0]) == [2, 1]
    assert checkpoints.prune_checkpoints(str(tmp_path / "model.ckpt"), 1, protect=[str(tmp_path / "model.ckpt-3")])
    assert _steps(checkpoints.list_checkpoints(str(tmp_path / "model.ckpt"))[0]) == [5, 3]


def test_resolve_a_directory_prefix_or_checkpoint(tmp_path):
    written = _save(tmp_path / "quant.ckpt", [7, 11])
    assert model_export.resolve_checkpoint(str(tmp_path)) == written[11]
    assert model_export.resolve_checkpoint(str(tmp_path / "quant.ckpt")) == written[11]
    assert model_export.resolve_checkpoint(written[7]) == written[7]
    _save(tmp_path / "float.ckpt", [20])
    with pytest.raises(model_export.ExportError, match=r"holds checkpoints of 2 prefixes \(float\.ckpt, quant\.ckpt\)"):
        model_export.resolve_checkpoint(str(tmp_path))
    assert model_export.resolve_checkpoint(str(tmp_path / "quant.ckpt")) == written[11]
    with pytest.raises(model_export.ExportError, match=r"checkpoint \S+nothing\.ckpt does not exist"):
        model_export.resolve_checkpoint(str(tmp_path / "nothing.ckpt"))
