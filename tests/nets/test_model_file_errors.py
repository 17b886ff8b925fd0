"""nets/model_file_run.py refuses what it cannot use with one line naming the file and what to do."""
import os
import shutil
import types

import numpy as np
import pytest
import tensorflow as tf

from learners import helper_factory
from learners.errors import UserError
from nets.errors import DataError
from tests.nets import model_file_fixtures as fx

tf1 = tf.compat.v1


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Small files each wrong in one way, and a good data set."""
    import keras
    directory = tmp_path_factory.mktemp("bad_models")
    shutil.copy(fx.shared_files()["dir"] / "data.npz", directory / "data.npz")
    rng = np.random.default_rng(0)
    np.savez(directory / "small.npz", x_train=rng.random((64, 4, 5, 2)).astype(np.float32),
             y_train=rng.integers(0, 3, 64), x_test=rng.random((8, 4, 5, 2)).astype(np.float32),
             y_test=rng.integers(0, 3, 8))
    (directory / "notes.txt").write_text("not a model")
    (directory / "garbage.pb").write_bytes(b"\xff\xff\xff\xff not a graph")
    (directory / "garbage.keras").write_bytes(b"PK not really a zip")
    os.makedirs(directory / "empty_dir")
    inputs = keras.Input((8, 8, 2))
    flat = keras.layers.Flatten()(keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    keras.Model(inputs, keras.layers.Dense(3)(flat)).save(directory / "lambda.keras")

    class Doubler(keras.layers.Layer):  # a custom layer the run script cannot know
        def call(self, t):
            return t * 2.0
    flat = keras.layers.Flatten()(Doubler()(inputs))
    keras.Model(inputs, keras.layers.Dense(3)(flat)).save(directory / "custom.keras")
    shared = keras.layers.Conv2D(2, 3, padding="same", use_bias=False)  # called twice: the whole model freezes
    flat = keras.layers.Flatten()(keras.layers.BatchNormalization()(shared(shared(inputs))))
    keras.Model(inputs, keras.layers.Dense(3)(flat)).save(directory / "shared.keras")

    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None, 8, 8, 2], name="images")
        volume = tf.reshape(images, [-1, 8, 8, 2, 1])
        x = tf.nn.conv3d(volume, tf.constant(np.ones((1, 1, 1, 1, 3), np.float32)), [1] * 5, "SAME")
        tf.identity(tf.reduce_mean(x, [1, 2, 3]), name="scores")
    (directory / "conv3d.pb").write_bytes(graph.as_graph_def().SerializeToString())

    class Looper(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(np.ones((128, 3), np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)])
        def __call__(self, images):
            x = tf.reshape(images, [-1, 128])
            for _ in tf.range(2):
                x = x * 0.5
            return {"scores": tf.matmul(x, self.kernel)}
    looper = Looper()
    tf.saved_model.save(looper, str(directory / "loop_sm"), signatures=looper.__call__)
    shared = fx.shared_files()["dir"]
    shutil.copy(shared / "frozen.pb", directory / "frozen.pb")
    shutil.copytree(shared / "module_sm", directory / "module_sm")
    return directory


def settings(directory, model, **overrides):
    values = dict(model=str(directory / model), data_npz=str(directory / "data.npz"), dataset=None, keras_model=None,
                  keras_unsafe=False, uql_save_keras=None, signature="serving_default", input_name=None,
                  output_name=None, save_model=None, uql_fold_batch_norms=False, learner="full-prec",
                  exec_mode="eval", save_path=str(directory / "models" / "model.ckpt"), data_dir_local=None,
                  batch_size=32, batch_size_eval=100, lrn_rate_init=None, momentum=None, loss_w_dcy=None,
                  nb_epochs_rat=None, train_subset=None, eval_subset=None, seed=0, resnet_size=20)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def refusal(directory, model, **overrides):
    """The one-line message the run script would print after 'error: '."""
    with pytest.raises((UserError, DataError)) as info:
        helper_factory.make_model_file_helper(settings(directory, model, **overrides))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("model,overrides,fragments", [
    ("notes.txt", {}, ["notes.txt", "no known format", "expected a .keras/.h5 file, a SavedModel directory"]),
    ("garbage.pb", {}, ["garbage.pb", "is not a GraphDef"]),
    ("garbage.keras", {}, ["garbage.keras", "not a Keras archive"]),
    ("empty_dir", {}, ["empty_dir", "without saved_model.pb"]),
    ("missing.keras", {}, ["missing.keras", "does not exist"]),
    ("module_sm", {"signature": "predict"}, ["module_sm", "no signature 'predict'", "serving_default"]),
    ("module_sm", {"output_name": "logits"}, ["module_sm", "no output 'logits'", "scores"]),
    ("frozen.pb", {"input_name": "pixels"}, ["frozen.pb", "no placeholder 'pixels'", "images"]),
    ("frozen.pb", {"output_name": "nope:0"}, ["frozen.pb", "no op 'nope:0'", "--output_name"]),
    ("frozen.pb", {"data_npz": "small.npz"}, ["small.npz", "are 4x5x2", "frozen graph", "expects 8x8x2"]),
    ("lambda.keras", {}, ["lambda.keras", "Lambda layer", "model.export"]),
    ("custom.keras", {}, ["custom.keras", "custom object", "Doubler"]),
    ("conv3d.pb", {}, ["conv3d.pb", "Conv3D", "cannot quantize", "expected Conv2D"]),
    ("loop_sm", {}, ["loop_sm", "control flow", "tfquant cannot rewrite"]),
    ("module_sm", {"keras_unsafe": True}, ["--keras_unsafe", "module_sm"]),
    ("frozen.pb", {"save_model": "out.keras", "learner": "ptq", "exec_mode": "train"},
     ["--save_model=out.keras", "expected a path ending in .pb"]),
    ("frozen.pb", {"save_model": "out.pb"}, ["--save_model=out.pb", "--learner full-prec", "uniform or ptq"]),
    ("frozen.pb", {"uql_fold_batch_norms": True}, ["--uql_fold_batch_norms", "frozen.pb", "frozen affine"]),
    ("shared.keras", {"uql_fold_batch_norms": True}, ["--uql_fold_batch_norms", "shared.keras",
                                                      "frozen inference graph"]),
])
def test_refusals_are_one_line(bad, model, overrides, fragments):
    if "data_npz" in overrides:
        overrides = dict(overrides, data_npz=str(bad / overrides["data_npz"]))
    message = refusal(bad, model, **overrides)
    for fragment in fragments:
        assert fragment in message, message


def test_run_script_prints_one_error_line(bad, tmp_path):
    result = fx.run_file(tmp_path, "--model=%s" % (bad / "garbage.pb"), "--data_npz=%s" % (bad / "data.npz"),
                         "--learner=ptq")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "garbage.pb" in lines[0] and "Traceback" not in result.stderr, result.stderr[-2000:]


def _mutations(data, rng, count):
    """Truncations and byte flips of a valid file."""
    for _ in range(count):
        damaged = bytearray(data)
        if rng.random() < 0.3:
            damaged = damaged[:int(rng.integers(1, len(damaged)))]
        else:
            for position in rng.integers(0, len(damaged), int(rng.integers(1, 8))):
                damaged[position] = int(rng.integers(0, 256))
        yield bytes(damaged)


def test_damaged_files_load_or_are_refused_in_one_line(bad, tmp_path):
    """Fuzz: damaged frozen graphs, Keras 3 archives and SavedModel protos never end in a traceback."""
    rng = np.random.default_rng(7)
    cases = [("frozen.pb", data) for data in _mutations((bad / "frozen.pb").read_bytes(), rng, 40)]
    cases += [("random.pb", rng.integers(0, 256, 300, dtype=np.uint8).tobytes())]
    saved = (bad / "module_sm" / "saved_model.pb").read_bytes()
    cases += [("module_sm", data) for data in _mutations(saved, rng, 8)]
    outcomes = {"loaded": 0, "refused": 0}
    for number, (name, data) in enumerate(cases):
        target = tmp_path / ("%d_%s" % (number, name))
        if name == "module_sm":
            shutil.copytree(bad / "module_sm", target)
            (target / "saved_model.pb").write_bytes(data)
        else:
            target.write_bytes(data)
        try:
            helper_factory.make_model_file_helper(settings(tmp_path, target.name, data_npz=str(bad / "data.npz")))
            outcomes["loaded"] += 1
        except (UserError, DataError) as exc:
            assert "\n" not in str(exc) and str(target) in str(exc), str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] >= len(cases) // 2, outcomes


def test_keras_script_points_to_the_model_file_script(bad, tmp_path):
    """keras_model_run.py on a tf.Module SavedModel: one line naming model_file_run.py (it was a traceback)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=fx.ROOT)
    result = fx.subprocess.run([fx.sys.executable, os.path.join(fx.ROOT, "nets", "keras_model_run.py"),
                                "--keras_model=%s" % (bad / "module_sm"), "--data_npz=%s" % (bad / "data.npz")],
                               cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "module_sm" in lines[0] and "nets/model_file_run.py --model" in lines[0], lines
