"""nets/model_file_run.py on files written by plain Keras 3 / TensorFlow: the file's own accuracy as the float
model, weights trainable, uniform and ptq runs, export, and --save_model reloading in plain TF / Keras with the
quantized model's predictions."""
import json
import re

import numpy as np
import pytest
import tensorflow as tf

from tests.nets import model_file_fixtures as fx


@pytest.fixture(scope="module")
def files():
    return fx.shared_files()


def printed(pattern, text):
    found = re.search(pattern, text)
    assert found, text[-3000:]
    return float(found.group(1))


def weight_layers(report):
    return [layer for layer in report["layers"] if layer["kind"] == "weight"]


def top1(scores):
    return np.asarray(scores).argmax(1)


def test_keras3_file_uniform_w4a8_trains_saves_and_exports(files, tmp_path):
    data = "--data_npz=%s" % (files["dir"] / "data.npz")
    model = "--model=%s" % (files["dir"] / "k3.keras")
    result = fx.run_file(tmp_path, model, data, "--learner=uniform", "--uql_weight_bits=4", "--uql_activation_bits=8",
                         "--uql_quantize_all_layers", "--uql_quant_epochs=0.5", "--save_model=tuned.keras")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    # The float model is the file's: its accuracy is Keras's own on the test set.
    keras_accuracy = float(np.mean(top1(files["keras_predictions"]) == files["y_test"]))
    assert printed(r"float accuracy:\s+([\d.]+)", out) == pytest.approx(keras_accuracy, abs=1e-4)
    # Every conv / dense weight, the biases and the batch-norm scale and offset became trainable variables.
    report = json.load(open(tmp_path / "models_uql" / "quant_report.json"))
    quantized = {layer["weight_variable"] for layer in weight_layers(report) if layer["status"] == "quantized"}
    assert quantized == {"model/conv/kernel", "model/conv_2/kernel", "model/fc/kernel"}
    reader = tf.train.load_checkpoint(str(tmp_path / "models_uql"))
    assert {"model/bn/gamma", "model/bn/moving_variance", "model/conv/bias"} <= set(reader.get_variable_to_shape_map())
    quant_accuracy = printed(r"quantized accuracy:\s+([\d.]+)", out)
    assert quant_accuracy >= keras_accuracy - 0.05

    import keras
    reloaded = keras.saving.load_model(str(tmp_path / "tuned.keras"))
    kernel = reloaded.get_layer("conv_2").kernel.numpy()
    # On the 4-bit grid of each output channel (the script's default: per-channel ranges).
    assert max(len(np.unique(kernel[..., channel])) for channel in range(kernel.shape[-1])) <= 16
    assert len(np.unique(kernel)) > 16
    assert not np.allclose(kernel, keras.saving.load_model(str(files["dir"] / "k3.keras"))
                           .get_layer("conv_2").kernel.numpy())  # fine-tuned
    reference = fx.quantized_checkpoint_logits(str(tmp_path / "models_uql"), files["x_test"])
    agreement = np.mean(top1(reloaded.predict(files["x_test"], verbose=0)) == top1(reference))
    assert agreement >= 0.999, agreement  # the quantized activations are in the file (test_model_file_keras_reload)
    assert json.load(open(tmp_path / "tuned.keras.quant_report.json")) == report
    # The file's batch norm trained with batch statistics: its moving averages moved, and went back into the file.
    original = keras.saving.load_model(str(files["dir"] / "k3.keras")).get_layer("bn")
    moved = reader.get_tensor("model/bn/moving_mean")
    assert np.abs(moved - original.moving_mean.numpy()).max() > 1e-4
    np.testing.assert_allclose(reloaded.get_layer("bn").moving_mean.numpy(), moved, rtol=1e-6)

    exported = fx.run_file(tmp_path, model, data, "--learner=uniform", "--uql_weight_bits=4",
                           "--uql_activation_bits=8", "--uql_quantize_all_layers", "--exec_mode=export",
                           "--export_dir=export", "--export_int8", "--export_onnx")
    assert exported.returncode == 0, exported.stderr[-3000:]
    for kind in ("tflite_int8", "onnx"):
        assert printed(r"accuracy %s\S*\s+([\d.]+)" % kind, exported.stdout) >= quant_accuracy - 0.03
    # Without --uql_weight_scheme / --uql_quantize_layer_outputs the script trained with the int8 runtimes' settings
    # (said in the log and the report), so the int8 file holds the trained grids and ranges, nothing re-gridded or
    # calibrated, and computes the quantized graph: every logit within one output step of it (with the shared
    # defaults, the asymmetric grid and calibrated layer outputs, 1.5 % of the images had a logit further away).
    assert "deployment settings of nets/model_file_run.py applied: --uql_weight_scheme=symmetric" in result.stdout
    assert any(note.startswith("deployment settings of nets/model_file_run.py applied") for note in report["notes"])
    assert (report["config"]["weight_scheme"], report["config"]["quantize_layer_outputs"]) == ("symmetric", True)
    summary = json.load(open(tmp_path / "export" / "export.json"))
    assert {w["int8"] for w in summary["trained_ranges"]["weights"]} == {"exact"}
    assert summary["trained_ranges"]["calibrated_tensors"] == []
    assert "warning:" not in exported.stdout and "hint:" not in exported.stdout
    from tfquant.export import tflite_export
    int8_file = str(tmp_path / "export" / "model_int8.tflite")
    int8_logits = tflite_export.run_tflite(open(int8_file, "rb").read(), files["x_test"])
    interpreter = tflite_export.make_interpreter(int8_file)
    step = interpreter.get_output_details()[0]["quantization"][0]
    assert np.abs(int8_logits - reference).max() <= 1.01 * step
    assert np.array_equal(top1(int8_logits), top1(reference))


def test_module_saved_model_ptq_saves_the_same_signature(files, tmp_path):
    result = fx.run_file(tmp_path, "--model=%s" % (files["dir"] / "module_sm"),
                         "--data_npz=%s" % (files["dir"] / "data.npz"), "--learner=ptq", "--uql_weight_bits=8",
                         "--uql_activation_bits=8", "--uql_quantize_all_layers", "--uql_calib_batches=2",
                         "--save_model=tuned_sm")
    assert result.returncode == 0, result.stderr[-3000:]
    original = tf.saved_model.load(str(files["dir"] / "module_sm")).signatures["serving_default"]
    float_accuracy = np.mean(top1(original(pixels=tf.constant(files["x_test"]))["scores"]) == files["y_test"])
    out = result.stdout + result.stderr
    assert printed(r"float accuracy:\s+([\d.]+)", out) == pytest.approx(float_accuracy, abs=1e-4)
    tuned = tf.saved_model.load(str(tmp_path / "tuned_sm")).signatures["serving_default"]
    scores = tuned(pixels=tf.constant(files["x_test"]))["scores"].numpy()
    reference = fx.quantized_checkpoint_logits(str(tmp_path / "models_uql"), files["x_test"])
    np.testing.assert_allclose(scores, reference, atol=1e-4)
    assert np.mean(top1(scores) == top1(reference)) >= 0.999


def test_frozen_graph_uniform_keeps_names(files, tmp_path):
    data = "--data_npz=%s" % (files["dir"] / "data.npz")
    model = "--model=%s" % (files["dir"] / "frozen.pb")
    result = fx.run_file(tmp_path, model, data, "--learner=uniform", "--uql_weight_bits=4", "--uql_activation_bits=8",
                         "--uql_quant_epochs=0.5", "--save_model=tuned.pb")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "models_uql" / "quant_report.json"))
    # conv (first) and matmul (last) kept float by default; the depthwise one quantized.
    assert [layer["status"] for layer in weight_layers(report)] == ["skipped", "quantized", "skipped"]
    reader = tf.train.load_checkpoint(str(tmp_path / "models_uql"))
    names = set(reader.get_variable_to_shape_map())
    assert {"model/conv/kernel", "model/conv/bias", "model/dw/kernel", "model/fc/kernel", "model/fc/bias"} <= names
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(open(tmp_path / "tuned.pb", "rb").read())
    probabilities = fx.run_graph_def(graph_def, "images:0", "probabilities:0", files["x_test"])
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)  # the softmax head is back
    reference = fx.quantized_checkpoint_logits(str(tmp_path / "models_uql"), files["x_test"])
    np.testing.assert_allclose(probabilities, tf.nn.softmax(reference).numpy(), atol=1e-5)
    assert np.mean(top1(probabilities) == top1(reference)) >= 0.999


def test_keras3_export_depthwise_ptq(files, tmp_path):
    result = fx.run_file(tmp_path, "--model=%s" % (files["dir"] / "k3_export"),
                         "--data_npz=%s" % (files["dir"] / "data.npz"), "--learner=ptq", "--uql_weight_bits=4",
                         "--uql_activation_bits=8", "--uql_quantize_all_layers", "--uql_calib_batches=2",
                         "--save_model=tuned_export")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "models_uql" / "quant_report.json"))
    types = sorted(layer["op_type"] for layer in weight_layers(report) if layer["status"] == "quantized")
    assert types == ["Conv2D", "Conv2D", "DepthwiseConv2dNative", "MatMul"]
    tuned = tf.saved_model.load(str(tmp_path / "tuned_export")).signatures["serving_default"]
    (key,) = tuned.structured_outputs
    scores = tuned(**{list(tuned.structured_input_signature[1])[0]: tf.constant(files["x_test"])})[key].numpy()
    reference = fx.quantized_checkpoint_logits(str(tmp_path / "models_uql"), files["x_test"])
    assert np.mean(top1(scores) == top1(reference)) >= 0.999


def test_keras3_attention_uniform_w4a8_exports_int8_tflite_and_onnx(files, tmp_path):
    # The converter folds its batch of 1 into the reshape after Keras 3's Tensordot, so the int8 file runs at
    # batch 1 only; the export used to refuse it (one error line, no file) when running it at batch 64.
    data = "--data_npz=%s" % (files["dir"] / "data.npz")
    model = "--model=%s" % (files["dir"] / "attention.keras")
    common = [model, data, "--learner=uniform", "--uql_weight_bits=4", "--uql_activation_bits=8",
              "--uql_quantize_all_layers"]
    trained = fx.run_file(tmp_path, *common, "--uql_quant_epochs=0.25")
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = fx.run_file(tmp_path, *common, "--exec_mode=export", "--export_dir=export", "--export_int8",
                           "--export_onnx")
    assert exported.returncode == 0, exported.stderr[-3000:]
    summary = json.load(open(tmp_path / "export" / "export.json"))
    reference = fx.quantized_checkpoint_logits(str(tmp_path / "models_uql"), files["x_test"])
    # The int8 file on LiteRT, one image at a time at its declared shape, against the quantized TF graph.
    from tfquant.export import tflite_export
    interpreter = tflite_export.make_interpreter(str(tmp_path / "export" / "model_int8.tflite"))
    interpreter.allocate_tensors()
    detail_in, detail_out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert list(detail_in["shape"]) == [1, 8, 8, 2] and detail_in["dtype"] == np.int8
    classes = []
    for image in files["x_test"]:
        interpreter.set_tensor(detail_in["index"], tflite_export.quantize_input(image[None], detail_in))
        interpreter.invoke()
        classes.append(int(interpreter.get_tensor(detail_out["index"]).argmax()))
    agreement = np.mean(np.array(classes) == top1(reference))
    # Measured 200 of 200 (196 before the export kept the layer norm's mean and the residual sum float as trained,
    # the projections' per-channel grids and the input's trained range, which Tensordot's Transpose hid).
    assert agreement >= 0.995, agreement
    assert "not_as_trained" not in summary  # nothing calibrated, no weight re-gridded
    assert summary["agreement_with_quantized_tf"]["tflite_int8"] == pytest.approx(agreement)
    assert summary["accuracy"]["tflite_int8"] == pytest.approx(np.mean(np.array(classes) == files["y_test"]))
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "model.onnx"))
    onnx_logits = session.run(None, {session.get_inputs()[0].name: files["x_test"]})[0]
    assert np.mean(top1(onnx_logits) == top1(reference)) >= 0.995  # measured 200 of 200 (196 before)
    assert summary["int8_layer_divergence"]["layers"]  # the per-layer check ran, one image at a time
