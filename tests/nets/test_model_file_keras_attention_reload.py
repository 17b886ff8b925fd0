"""--save_model of a Keras 3 file with self-attention (MultiHeadAttention(x, x)) and LayerNormalization: the model
is rebuilt with the attention layer frozen alone, and the saved file reloads in plain Keras (safe mode) with the
quantized graph's grids: on the attention projections (before their biases), on the rank-3 Dense layers' inputs
and outputs, and on LayerNormalization's offset (which the quantized graph rounds)."""
import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from tests.nets import model_file_fixtures as fx

RELOAD = """
import sys, numpy as np, keras
model = keras.saving.load_model("tuned.keras", safe_mode=True)
np.save("reloaded.npy", model.predict(np.load("images.npy"), verbose=0))
assert not any(name.split(".")[0] in ("tfquant", "nets") for name in sys.modules)
"""


def _attention_model(path, x_train, y_train):
    import keras
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Dense(8, name="embed")(keras.layers.Reshape((16, 8))(inputs))
    x = keras.layers.LayerNormalization(name="norm")(x + keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x))
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc")(keras.layers.GlobalAveragePooling1D()(x)))
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0)
    model.save(path)


def _output_step(run_dir, report):
    """The step of the logits' 8-bit grid (the fc layer's recorded output range)."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(run_dir))
    (entry,) = [layer for layer in report["layers"] if layer["kind"] == "activation"
                and layer["name"].startswith("model/fc/") and layer["name"].endswith(":output")]
    low, high = (float(reader.get_tensor(name)) for name in sorted(
        (v for v in entry["range_variables"] if v.endswith(("/ema_min", "/ema_max"))), key=lambda n: n.endswith("max")))
    return (high - low) / (2 ** entry["bits"] - 1)


def test_saved_self_attention_model_reloads_with_the_quantized_grids(tmp_path):
    x_train, y_train, x_test, _ = fx.make_data(str(tmp_path))
    _attention_model(str(tmp_path / "attention.keras"), x_train, y_train)
    result = fx.run_file(tmp_path, "--model=%s" % (tmp_path / "attention.keras"),
                         "--data_npz=%s" % (tmp_path / "data.npz"), "--learner=ptq", "--uql_calib_batches=2",
                         "--uql_weight_bits=8", "--uql_activation_bits=8", "--uql_quantize_all_layers",
                         "--save_model=tuned.keras")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    # MultiHeadAttention(x, x) no longer makes the whole model one frozen graph.
    assert "runs as its frozen inference graph" not in out
    assert "mha split into its query/key/value projections" in out
    run_dir = str(tmp_path / "models_uql")
    report = json.load(open(os.path.join(run_dir, "quant_report.json")))
    reference = fx.quantized_checkpoint_logits(run_dir, x_test)
    np.save(tmp_path / "images.npy", x_test)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TF_USE_LEGACY_KERAS")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    reloaded = subprocess.run([sys.executable, "-c", RELOAD], cwd=str(tmp_path), env=env, capture_output=True,
                              text=True, timeout=300)
    assert reloaded.returncode == 0, reloaded.stderr[-3000:]
    scores = np.load(tmp_path / "reloaded.npy")
    assert np.array_equal(scores.argmax(1), reference.argmax(1))
    # Before: MultiHeadAttention(x, x) made the model one frozen graph saved with float activations (logits up to 16
    # steps of their grid away); with the projections before their biases and LayerNorm's offset float, 3 steps.
    step = _output_step(run_dir, report)
    assert np.abs(scores - reference).max() <= step, (np.abs(scores - reference).max(), step)
    # Float accumulation order may differ between Keras's and tfquant's graphs; a step would differ by far more.
    np.testing.assert_allclose(scores, reference, rtol=1e-4, atol=1e-5)
    assert "float at" not in out
