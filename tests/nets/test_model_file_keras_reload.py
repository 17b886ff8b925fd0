"""--save_model of a Keras 3 file reloads in a plain Keras process (safe mode, no tfquant on the path) with the
quantized model's activations, so its scores are the quantized evaluation graph's; and the model-file script's
default of per-channel weight ranges (--uql_use_buckets, channel), which an explicit flag overrides."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.nets import model_file_fixtures as fx

RELOAD = """
import sys, numpy as np, keras
assert not any(name.split(".")[0] in ("tfquant", "nets") for name in sys.modules)
images = np.load("images.npy")
for name in sys.argv[1:]:
    model = keras.saving.load_model(name, safe_mode=True)
    np.save(name + ".npy", model.predict(images, verbose=0))
assert not any(name.split(".")[0] in ("tfquant", "nets") for name in sys.modules)
"""


def _models(directory, x_train, y_train):
    """conv + batch norm + relu + dense (Sequential, softmax head) and a depthwise model (functional, logits)."""
    import keras
    keras.utils.set_random_seed(3)
    conv_bn = keras.Sequential([
        keras.Input((8, 8, 2)), keras.layers.Conv2D(8, 3, padding="same", name="conv"),
        keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(name="relu"),
        keras.layers.MaxPooling2D(name="pool"), keras.layers.Flatten(name="flat"),
        keras.layers.Dense(16, activation="relu", name="hidden"), keras.layers.Dense(3, activation="softmax",
                                                                                      name="fc")])
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(8, 1, activation="relu", name="expand")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.Activation("relu6", name="dw_relu6")(x)
    x = keras.layers.SeparableConv2D(8, 3, padding="same", activation="relu", name="separable")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    depthwise = keras.Model(inputs, keras.layers.Dense(3, name="fc")(x))
    for model, logits in ((conv_bn, False), (depthwise, True)):
        model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=logits))
        model.fit(x_train, y_train, epochs=3, batch_size=32, verbose=0)
    conv_bn.save(os.path.join(directory, "conv_bn.keras"))
    depthwise.save(os.path.join(directory, "depthwise.keras"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both models fine-tuned (uniform W4A8, default buckets) / calibrated (ptq W4A8, no buckets) and saved,
    then reloaded together in one plain Keras process."""
    directory = tmp_path_factory.mktemp("keras_reload")
    x_train, y_train, x_test, _ = fx.make_data(str(directory))
    _models(str(directory), x_train, y_train)
    data = "--data_npz=%s" % (directory / "data.npz")
    results = {}
    # The script's defaults train for deployment (the symmetric grid, the model input, layer outputs and the logits
    # before the softmax quantized too); conv_bn_float_outputs leaves those the shared defaults.
    for name, flags in (("conv_bn", ["--learner=uniform", "--uql_quant_epochs=0.25"]),
                        ("depthwise", ["--learner=ptq", "--uql_calib_batches=2", "--uql_use_buckets=false"]),
                        ("conv_bn_float_outputs", ["--learner=ptq", "--uql_calib_batches=2",
                                                   "--uql_weight_scheme=asymmetric",
                                                   "--nouql_quantize_layer_outputs"])):
        cwd = directory / name
        cwd.mkdir()
        model = name.replace("_float_outputs", "")
        result = fx.run_file(cwd, "--model=%s" % (directory / ("%s.keras" % model)), data, "--uql_weight_bits=4",
                             "--uql_activation_bits=8", "--uql_quantize_all_layers", "--save_model=tuned.keras",
                             *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = {"dir": cwd, "out": result.stdout + result.stderr,
                         "report": json.load(open(cwd / "models_uql" / "quant_report.json")),
                         "reference": fx.quantized_checkpoint_logits(str(cwd / "models_uql"), x_test)}
    np.save(directory / "images.npy", x_test)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TF_USE_LEGACY_KERAS")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for name in results:
        os.link(results[name]["dir"] / "tuned.keras", directory / ("%s_tuned.keras" % name))
    reloaded = subprocess.run([sys.executable, "-c", RELOAD] + ["%s_tuned.keras" % name for name in results],
                              cwd=str(directory), env=env, capture_output=True, text=True, timeout=300)
    assert reloaded.returncode == 0, reloaded.stderr[-3000:]
    for name in results:
        results[name]["reloaded"] = np.load(directory / ("%s_tuned.keras.npy" % name))
    return results


@pytest.mark.parametrize("name", ["conv_bn", "depthwise", "conv_bn_float_outputs"])
def test_saved_keras3_file_reloads_with_the_quantized_scores(runs, name):
    run = runs[name]
    activations = [layer for layer in run["report"]["layers"]
                   if layer["kind"] == "activation" and layer["status"] == "quantized"]
    assert len(activations) >= 2  # the check below is about them
    reference = run["reference"]
    scores = tf.nn.softmax(reference).numpy() if name.startswith("conv_bn") else reference
    # The model input and the logits before the softmax are on their grids in the file (without them 43 % of the
    # scores differed), and so is each bias the quantized graph rounds to the int32 grid of its input's step times its
    # weight's (saved as trained, the scores of 7 % of the images differed by an activation step).
    # Float accumulation order differs between Keras's and tfquant's graphs; a level of an 8-bit activation (1/255
    # of its range) would differ by far more.
    if name == "depthwise":
        # Its SeparableConv2D runs as a frozen layer, inside which the quantized graph also rounds the depthwise
        # output: the file holds it as DepthwiseConv2D, that grid, then a 1x1 Conv2D (as one layer, the scores of 47 %
        # of the images were a step of the logits' grid away).
        assert "separable split into DepthwiseConv2D" in run["out"]
    np.testing.assert_allclose(run["reloaded"], scores, rtol=1e-4, atol=1e-5)
    assert np.array_equal(run["reloaded"].argmax(1), reference.argmax(1))
    assert "activations quantized after %d layers" % len(activations) in run["out"]


def test_model_file_weights_default_to_per_channel_ranges(runs):
    weights = [layer for layer in runs["conv_bn"]["report"]["layers"]
               if layer["kind"] == "weight" and layer["status"] == "quantized"]
    assert [(layer["bucket_type"], layer["num_groups"]) for layer in weights] == [
        ("channel", layer["shape"][-1]) for layer in weights]
    assert runs["conv_bn"]["report"]["config"]["use_buckets"] is True
    # An explicit --uql_use_buckets=false wins over the script's default: one range per tensor.
    explicit = [layer for layer in runs["depthwise"]["report"]["layers"]
                if layer["kind"] == "weight" and layer["status"] == "quantized"]
    assert len(explicit) >= 4 and all(layer["num_groups"] == 1 for layer in explicit)
