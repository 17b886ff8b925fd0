"""System errors are user errors, the save policy, and flags: one line naming the path or flag; nothing lost."""
import errno
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from learners import flags as learner_flags
from learners import run_settings, training
from learners.errors import UserError
from tests.learners.test_bad_input import _error_line
from tests.learners.test_end_to_end import run_script
from tests.learners.test_reliability import _toy_model
from tfquant import checkpoints

tf1 = tf.compat.v1


def _toy(tmp_path, save_step, save_secs=1e9, fail_at=None, error=None):
    """Train the 10-step toy model, saving under tmp_path/ckpt; `error` is raised by the save at step fail_at."""
    model = _toy_model(lambda v: v + 1.0, lambda a, b: tf.reduce_sum(a) * 0.0 + 1.0)
    real_save = model.saver.save

    def save(sess, path, global_step, **kwargs):
        if global_step == fail_at:
            # A partial file as a failing TensorFlow write leaves it.
            open("%s-%d.data-00000-of-00001.tempstate123" % (path, global_step), "w").close()
            raise error
        return real_save(sess, path, global_step=global_step, **kwargs)

    model.saver.save = save
    with tf1.Session(graph=model.graph) as sess:
        sess.run(model.init_op)
        writer = tf1.summary.FileWriter(str(tmp_path / "logs"))
        try:
            return training.run_training(sess, model, str(tmp_path / "ckpt" / "model.ckpt"), writer, 100, save_step,
                                         1, "toy", save_secs=save_secs)
        finally:
            writer.close()


@pytest.mark.parametrize("error,reason", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), os.strerror(errno.ENOSPC)),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), os.strerror(errno.EROFS)),
    (tf.errors.ResourceExhaustedError(None, None, "tmp; No space left on device"), "tmp; No space left on device"),
    (tf.errors.PermissionDeniedError(None, None, "model.ckpt-6; Permission denied"), "Permission denied"),
])
def test_failed_save_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, error, reason):
    with pytest.raises(UserError) as caught:
        _toy(tmp_path, save_step=3, fail_at=6, error=error)
    message = str(caught.value)
    prefix = tmp_path / "ckpt" / "model.ckpt"
    assert message.startswith("checkpoint %s-6 cannot be saved (" % prefix) and reason in message, message
    assert message.endswith("expected a writable directory with free space; the last good checkpoint %s-3 is kept"
                            % prefix)
    assert "\n" not in message
    assert checkpoints.latest_valid_checkpoint(str(prefix))[:2] == (str(prefix) + "-3", 3)
    reader = tf.train.load_checkpoint(str(prefix) + "-3")
    np.testing.assert_array_equal(reader.get_tensor("model/a"), np.full([2], 4.0, np.float32))  # 1 + 3 steps
    assert sorted(os.listdir(str(tmp_path / "ckpt"))) == ["checkpoint", "model.ckpt-3.data-00000-of-00001",
                                                         "model.ckpt-3.index"]


def test_time_based_saves_are_pruned_to_the_keep_limit(tmp_path):
    # save_step 100 never fires; save_secs ~0 saves after every step; three are kept, the newest.
    final = _toy(tmp_path, save_step=100, save_secs=1e-9)
    assert final == str(tmp_path / "ckpt" / "model.ckpt-10")
    steps = [checkpoints.step_of(p) for p in checkpoints.list_checkpoints(str(tmp_path / "ckpt" / "model.ckpt"))[0]]
    assert steps == [10, 9, 8]
    reader = tf.train.load_checkpoint(final)
    np.testing.assert_array_equal(reader.get_tensor("model/b"), np.full([3], 11.0, np.float32))


def test_step_based_saves_without_time(tmp_path):
    _toy(tmp_path, save_step=4)
    steps = [checkpoints.step_of(p) for p in checkpoints.list_checkpoints(str(tmp_path / "ckpt" / "model.ckpt"))[0]]
    assert steps == [10, 8, 4]


def test_unwritable_settings_record_is_one_line(tmp_path, monkeypatch):
    def refuse(path, data):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(run_settings.files, "write_atomically", refuse)
    with pytest.raises(UserError, match=r"^run settings file %s cannot be written \(Permission denied\); expected a "
                                        r"writable directory with free space$"
                                        % (tmp_path / "m.ckpt.settings.json")):
        run_settings.write_record(str(tmp_path / "m.ckpt"), "full-prec", {"batch_size": 1})


def test_settings_json_is_written_atomically_with_unique_temporaries(tmp_path, monkeypatch):
    names = []
    real = os.replace

    def recording(source, target):
        names.append(source)  # the temporary file renamed over the record
        return real(source, target)

    monkeypatch.setattr(run_settings.files.os, "replace", recording)
    for value in (1, 2):
        run_settings.write_record(str(tmp_path / "m.ckpt"), "full-prec", {"batch_size": value})
    assert len(set(names)) == 2 and not any(os.path.exists(n) for n in names)
    assert run_settings.load_record(str(tmp_path / "m.ckpt"))["settings"] == {"batch_size": 2}


def test_every_uql_flag_that_shapes_the_model_is_recorded():
    learner_flags.define_flags()
    # Output paths say where results go, not what the model is; the analysis flags say what is measured of it;
    # recomputation in the backward pass changes how the same values are computed, not the values.
    uql = {name for name in learner_flags.FLAGS if name.startswith("uql_")} - {
        "uql_save_quant_model_path", "uql_save_keras", "uql_analysis_batches", "uql_histograms",
        "uql_recompute_quantized"}
    assert uql <= set(run_settings.QUANT_FLAGS)
    assert {"enbl_dst", "loss_w_dst", "tempr_dst"} <= set(run_settings.QUANT_FLAGS)


@pytest.fixture
def parsed_flags(tmp_path, monkeypatch):
    learner_flags.define_flags()
    monkeypatch.chdir(tmp_path)

    def parse(*args):
        learner_flags.FLAGS.unparse_flags()
        learner_flags.FLAGS(["run"] + list(args))
        learner_flags.validate_flags()
    yield parse
    learner_flags.FLAGS.unparse_flags()


def test_every_float_flag_refuses_nan_and_inf(parsed_flags):
    names = learner_flags.float_flag_names()
    assert {"lrn_rate_init", "momentum", "loss_w_dcy", "nb_epochs_rat", "uql_quant_epochs", "uql_lrn_rate_init",
            "uql_ema_decay", "save_secs"} <= set(names)
    for name in names:
        for text in ("nan", "inf", "-inf", "NaN", "Infinity"):
            with pytest.raises(UserError) as caught:
                parsed_flags("--%s=%s" % (name, text))
            value = float(text)
            assert str(caught.value) == "--%s=%s is not valid; expected a finite number" % (
                name, "nan" if math.isnan(value) else value), name
    parsed_flags("--save_secs=0.5", "--learner=uniform", "--uql_ema_decay=0.9")  # finite values pass


def test_save_secs_must_be_positive(parsed_flags):
    with pytest.raises(UserError, match=r"^--save_secs=0\.0 is not valid; expected a positive number$"):
        parsed_flags("--save_secs=0")


def test_nan_flag_through_the_run_script(tmp_path):
    line = _error_line(run_script("convnet_at_fmnist_run.py", ["--learner=uniform", "--uql_ema_decay=nan"],
                                  str(tmp_path)))
    assert line == "error: --uql_ema_decay=nan is not valid; expected a finite number"
    assert not os.listdir(str(tmp_path))
