"""Keras model files through nets/keras_model_run.py: the file's weights and accuracy, training-mode batch norm
while fine-tuning, saving back, safe mode, and one-line errors. Keras runs only in subprocesses (it needs
TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Writes the data, the models and the references (Keras's own predictions and weights) into the cwd.
MAKE_MODELS = textwrap.dedent("""
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np, tf_keras as K
    K.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    def split(n):
        y = rng.integers(0, 3, n)
        x = rng.normal(0, 1, (n, 8, 8, 2)).astype(np.float32)
        x[:, :, :, 0] += y[:, None, None]
        return x, y
    x_train, y_train = split(256)
    x_test, y_test = split(100)
    np.savez("data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    np.savez("wide.npz", x_train=x_train, y_train=y_train + 3, x_test=x_test, y_test=y_test)
    inp = K.Input((8, 8, 2))
    x = K.layers.Conv2D(6, 3, padding="same")(inp)
    x = K.layers.BatchNormalization()(x)
    x = K.layers.ReLU()(x)
    x = K.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = K.layers.SeparableConv2D(8, 3, padding="same", activation="relu")(x)
    x = K.layers.GlobalAveragePooling2D()(x)
    functional = K.Model(inp, K.layers.Dense(3, activation="softmax")(x))
    sequential = K.Sequential([K.Input((8, 8, 2)), K.layers.Conv2D(4, 3, activation="relu"),
                               K.layers.BatchNormalization(), K.layers.SeparableConv2D(4, 3, activation="relu"),
                               K.layers.Flatten(), K.layers.Dense(3)])
    refs = {}
    for name, model, loss in (("functional", functional, "sparse_categorical_crossentropy"),
                              ("sequential", sequential, K.losses.SparseCategoricalCrossentropy(from_logits=True))):
        model.compile("adam", loss)
        model.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0)
        refs[name + "/predictions"] = model.predict(x_test, verbose=0)
        for weight in model.weights:
            refs[name + "/" + weight.name[:-2]] = weight.numpy()
    functional.save("functional.h5")
    functional.save("functional_savedmodel")
    sequential.save("sequential.keras")
    np.savez("refs.npz", **refs)
    lam_in = K.Input((8, 8, 2))
    lam = K.Model(lam_in, K.layers.Dense(3)(K.layers.Flatten()(K.layers.Lambda(lambda t: t * 2.0)(lam_in))))
    for path in ("lambda.h5", "lambda.keras", "lambda_savedmodel"):
        lam.save(path)
    K.Sequential([K.Input((8, 8, 2)), sequential]).save("nested.h5")
    """)

# Loads one Keras file and dumps its weights (named as in the file) to an npz.
DUMP_WEIGHTS = textwrap.dedent("""
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np, tf_keras as K
    model = K.models.load_model(sys.argv[1], compile=False)
    np.savez(sys.argv[2], **{w.name[:-2]: w.numpy() for w in model.weights})
    """)

# Calls the loader and the helper directly, printing each error's class and message.
PROBE = textwrap.dedent("""
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    sys.path.insert(0, sys.argv[1])
    from nets import keras_model
    for path in ("lambda.h5", "lambda.keras", "lambda_savedmodel"):
        try:
            keras_model.load_keras_model(path)
            print("LOADED", path)
        except keras_model.KerasModelError as exc:
            print("ERROR", type(exc).__name__, exc.path, exc)
        print("UNSAFE", path, len(keras_model.load_keras_model(path, unsafe=True).weights))
    try:
        keras_model.load_keras_model("nested.h5")
    except keras_model.KerasModelError as exc:
        print("ERROR", exc)
    for kwargs in (dict(data_npz="wide.npz"), dict(dataset="fmnist")):
        try:
            keras_model.KerasModelHelper("functional.h5", batch_size=32, **kwargs)
        except ValueError as exc:
            print("ERROR", type(exc).__name__, exc)
    """)


def python(args, cwd, legacy_keras=True):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    if legacy_keras:
        env["TF_USE_LEGACY_KERAS"] = "1"
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def run_keras(cwd, *flags):
    return python([os.path.join(ROOT, "nets", "keras_model_run.py"), "--batch_size=32", "--batch_size_eval=50",
                   "--summ_step=4"] + list(flags), str(cwd), legacy_keras=False)


@pytest.fixture(scope="module")
def keras_dir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("keras")
    result = python(["-c", MAKE_MODELS], str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def accuracy_of(predictions, cwd):
    return float(np.mean(predictions.argmax(1) == np.load(str(cwd / "data.npz"))["y_test"]))


def printed(pattern, text):
    match = re.search(pattern, text)
    assert match, text[-2000:]
    return float(match.group(1))


@pytest.mark.parametrize("model_file,name", [("functional.h5", "functional"),
                                             ("functional_savedmodel", "functional"),
                                             ("sequential.keras", "sequential")])
def test_ptq_starts_from_the_files_weights_and_accuracy(keras_dir, tmp_path, model_file, name):
    refs = np.load(str(keras_dir / "refs.npz"))
    result = run_keras(tmp_path, "--keras_model=%s" % (keras_dir / model_file),
                       "--data_npz=%s" % (keras_dir / "data.npz"), "--learner=ptq", "--uql_weight_bits=8", "--uql_activation_bits=8", "--uql_calib_batches=2")
    assert result.returncode == 0, result.stderr[-3000:]
    float_accuracy = printed(r"float accuracy:\s+([0-9.]+)", result.stdout)
    assert float_accuracy == pytest.approx(accuracy_of(refs[name + "/predictions"], keras_dir), abs=1e-4)
    float_checkpoint = tf.train.load_checkpoint(str(tmp_path / "models" / "model.ckpt-8"))
    weight_names = [key[len(name) + 1:] for key in refs.files
                    if key.startswith(name + "/") and key != name + "/predictions"]
    assert weight_names
    for weight in weight_names:
        np.testing.assert_array_equal(float_checkpoint.get_tensor("model/" + weight), refs[name + "/" + weight])
    results = json.load(open(str(tmp_path / "models_uql" / "results.json")))
    assert results["quant_accuracy"] == pytest.approx(printed(r"quantized accuracy:\s+([0-9.]+)", result.stdout),
                                                      abs=1e-4)
    # The calibrated ranges are the ones the quantized checkpoint holds.
    quantized = tf.train.load_checkpoint(os.path.join(str(tmp_path), results["quant_checkpoint"]))
    assert results["activation_ranges"]
    for op_name, (lo, hi) in results["activation_ranges"].items():
        scope = op_name + "/act_quant/"
        assert quantized.get_tensor(scope + "ema_min") == pytest.approx(lo, rel=1e-6, abs=1e-7)
        assert quantized.get_tensor(scope + "ema_max") == pytest.approx(hi, rel=1e-6)
        assert quantized.get_tensor(scope + "ema_steps") == 2


def test_uniform_fine_tunes_the_file_and_saves_it_back(keras_dir, tmp_path):
    refs = np.load(str(keras_dir / "refs.npz"))
    data = "--data_npz=%s" % (keras_dir / "data.npz")
    model = "--keras_model=%s" % (keras_dir / "functional.h5")
    result = run_keras(tmp_path, model, data, "--learner=uniform", "--uql_activation_bits=8",
                       "--uql_quant_epochs=0.5", "--uql_save_keras=tuned.h5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no float checkpoint" not in result.stdout  # the file is the float model: nothing trained in float
    assert printed(r"float accuracy:\s+([0-9.]+)", result.stdout) == pytest.approx(
        accuracy_of(refs["functional/predictions"], keras_dir), abs=1e-4)
    results = json.load(open(str(tmp_path / "models_uql" / "results.json")))
    tuned = tf.train.load_checkpoint(os.path.join(str(tmp_path), results["quant_checkpoint"]))
    # Batch norm ran in training mode: its moving statistics moved from the file's.
    assert not np.allclose(tuned.get_tensor("model/batch_normalization/moving_mean"),
                           refs["functional/batch_normalization/moving_mean"])
    dumped = python(["-c", DUMP_WEIGHTS, "tuned.h5", "tuned_weights.npz"], str(tmp_path))
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    saved = np.load(str(tmp_path / "tuned_weights.npz"))
    assert sorted(saved.files) == sorted(k[len("functional/"):] for k in refs.files
                                         if k.startswith("functional/") and k != "functional/predictions")
    for name in saved.files:
        np.testing.assert_array_equal(saved[name], tuned.get_tensor("model/" + name))
    with open(str(tmp_path / "tuned.h5.quant_report.json"), "rb") as copy, open(results["report"], "rb") as original:
        assert copy.read() == original.read()
    evaluated = run_keras(tmp_path, model, data, "--learner=uniform", "--exec_mode=eval")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert printed(r"uniform eval: accuracy ([0-9.]+)", evaluated.stdout) == pytest.approx(
        results["quant_accuracy"], abs=1e-4)
    # The run directory holds the inference graph of the Keras network: the run script exports it, and so
    # does tfquant.export alone, with tf_keras, nets and learners unimportable.
    exported = run_keras(tmp_path, model, data, "--learner=uniform", "--exec_mode=export", "--export_dir=export")
    assert exported.returncode == 0, exported.stderr[-2000:]
    accuracy = {kind: float(value)
                for kind, value in re.findall(r"^accuracy (\S+)\s+([0-9.]+)$", exported.stdout, re.M)}
    assert set(accuracy) == {"quantized_checkpoint", "frozen_graph"}
    assert accuracy["quantized_checkpoint"] == pytest.approx(results["quant_accuracy"], abs=1e-4)
    alone = python(["-c", "import sys; sys.modules['tf_keras'] = sys.modules['nets'] = sys.modules['learners'] = None; "
                    "from tfquant.export.__main__ import main; sys.exit(main(sys.argv[1:]))",
                    "--checkpoint_dir", "models_uql", "--output_dir", "export_alone",
                    "--eval_npz", str(keras_dir / "data.npz")], str(tmp_path), legacy_keras=False)
    assert alone.returncode == 0, alone.stderr[-2000:]
    summary = json.load(open(str(tmp_path / "export_alone" / "export.json")))
    assert summary["test_images"] == 100 and summary["input"]["shape"] == [None, 8, 8, 2]
    assert summary["accuracy"]["quantized_checkpoint"] == pytest.approx(results["quant_accuracy"], abs=1e-4)
    assert summary["frozen_vs_checkpoint"]["argmax_agreement"] == 1.0


def test_safe_mode_refuses_lambda_layers_and_data_that_does_not_fit(keras_dir):
    result = python(["-c", PROBE, ROOT], str(keras_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for path in ("lambda.h5", "lambda.keras", "lambda_savedmodel"):
        assert not any(line == "LOADED " + path for line in lines)
        assert "UNSAFE %s 2" % path in lines  # --keras_unsafe loads it (Dense kernel and bias)
        errors = [line for line in lines if line.startswith("ERROR KerasModelError %s " % path)]
        assert len(errors) == 1 and ("Lambda" in errors[0] or "lambda" in errors[0]), lines
    assert any("nested.h5 nests the model sequential; expected a flat model" in line for line in lines), lines
    assert any("wide.npz holds the label 5; the Keras model functional.h5 has 3 classes" in line for line in lines)
    assert any("images of fmnist are 28x28x1; the Keras model functional.h5 expects 8x8x2" in line
               or "Fashion-MNIST" in line for line in lines), lines


def test_run_script_errors_are_one_line(keras_dir, tmp_path):
    result = run_keras(tmp_path, "--keras_model=%s" % (keras_dir / "lambda.h5"),
                       "--data_npz=%s" % (keras_dir / "data.npz"), "--learner=ptq")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: Keras model ")
    assert "--keras_unsafe" in result.stderr
    assert not (tmp_path / "models").exists()


# Rewrites a Keras file in place with every weight changed (same architecture, other content).
PERTURB = textwrap.dedent("""
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tf_keras as K
    model = K.models.load_model(sys.argv[1], compile=False)
    for weight in model.weights:
        weight.assign(weight * 0.5 + 0.01)
    model.save(sys.argv[1])
    """)


def sha256_of(path):
    with open(str(path), "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_content_digest_of_files_and_saved_model_directories(tmp_path):
    from nets import keras_model
    from nets.errors import DataError

    single = tmp_path / "model.h5"
    single.write_bytes(os.urandom(3 * (1 << 20) + 17))  # several read chunks
    assert keras_model.content_digest(str(single), DataError) == sha256_of(single)
    saved = tmp_path / "saved"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"graph")
    (saved / "variables" / "variables.index").write_bytes(b"index")
    (saved / "variables" / "variables.data-00000-of-00001").write_bytes(b"weights")
    digest = keras_model.content_digest(str(saved), DataError)
    assert len(digest) == 64 and digest == keras_model.content_digest(str(saved), DataError)
    assert digest != hashlib.sha256(b"graphindexweights").hexdigest()
    seen = {digest}
    # One weight byte changed, a file renamed, a file added, bytes moved from one file to the next: each is
    # another model and must give another digest.
    (saved / "variables" / "variables.data-00000-of-00001").write_bytes(b"weightS")
    seen.add(keras_model.content_digest(str(saved), DataError))
    (saved / "variables" / "variables.data-00000-of-00001").write_bytes(b"weights")
    assert keras_model.content_digest(str(saved), DataError) == digest
    os.rename(str(saved / "saved_model.pb"), str(saved / "saved_model.pbtxt"))
    seen.add(keras_model.content_digest(str(saved), DataError))
    os.rename(str(saved / "saved_model.pbtxt"), str(saved / "saved_model.pb"))
    (saved / "fingerprint.pb").write_bytes(b"")
    seen.add(keras_model.content_digest(str(saved), DataError))
    os.remove(str(saved / "fingerprint.pb"))
    (saved / "variables" / "variables.index").write_bytes(b"indexw")
    (saved / "variables" / "variables.data-00000-of-00001").write_bytes(b"eights")
    seen.add(keras_model.content_digest(str(saved), DataError))
    assert len(seen) == 5
    os.mkfifo(str(saved / "assets"))
    with pytest.raises(DataError, match=r"assets is a FIFO; expected a regular file"):
        keras_model.content_digest(str(saved), DataError)


def test_rerun_with_another_model_or_data_is_refused(keras_dir, tmp_path):
    model = tmp_path / "model.h5"
    shutil.copyfile(str(keras_dir / "functional.h5"), str(model))
    data = "--data_npz=%s" % (keras_dir / "data.npz")
    ptq = ("--keras_model=%s" % model, "--learner=ptq", "--uql_weight_bits=8", "--uql_activation_bits=8",
           "--uql_calib_batches=1")
    first = run_keras(tmp_path, data, *ptq)
    assert first.returncode == 0, first.stderr[-3000:]
    first_digest = sha256_of(model)
    # The run directory's lock file names its latest holder's pid; every other file must stay as it was.
    float_files = {p.name: p.read_bytes() for p in (tmp_path / "models").iterdir() if p.name != ".tfquant.lock"}

    # The same path, other weights: neither fine-tuning nor calibration may start from the old file's checkpoint.
    perturbed = python(["-c", PERTURB, str(model)], str(tmp_path))
    assert perturbed.returncode == 0, perturbed.stderr[-2000:]
    tuned = "--uql_save_quant_model_path=%s" % (tmp_path / "tuned" / "model.ckpt")
    for learner in (("--learner=uniform", "--uql_quant_epochs=0.1", tuned), ("--learner=ptq",)):
        rerun = run_keras(tmp_path, data, *(ptq + learner))
        assert rerun.returncode == 2, (learner, rerun.stdout[-2000:], rerun.stderr[-1500:])
        assert rerun.stderr.count("\n") == 1 and rerun.stderr.startswith("error: settings differ"), rerun.stderr
        assert "keras_model_sha256 %s (recorded) vs %s (now)" % (first_digest, sha256_of(model)) in rerun.stderr

    # The first model again with other data under the same file name.
    shutil.copyfile(str(keras_dir / "functional.h5"), str(model))
    (tmp_path / "other").mkdir()
    arrays = dict(np.load(str(keras_dir / "data.npz")))
    arrays["y_train"] = arrays["y_train"][::-1].copy()
    np.savez(str(tmp_path / "other" / "data.npz"), **arrays)
    rerun = run_keras(tmp_path, "--data_npz=%s" % (tmp_path / "other" / "data.npz"), *ptq)
    assert rerun.returncode == 2, rerun.stdout[-2000:]
    assert rerun.stderr.count("\n") == 1 and "data_npz_sha256" in rerun.stderr, rerun.stderr
    assert "keras_model_sha256" not in rerun.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "models").iterdir() if p.name != ".tfquant.lock"} == float_files
    record = json.load(open(str(tmp_path / "models" / "model.ckpt.settings.json")))
    assert record["settings"]["keras_model_sha256"] == first_digest
    assert record["settings"]["data_npz_sha256"] == sha256_of(keras_dir / "data.npz")
