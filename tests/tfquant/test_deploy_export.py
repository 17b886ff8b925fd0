"""Deployment that reproduces training: folded + symmetric W8A8 model exported with its trained ranges
to int8 TFLite (no representative data set for trained tensors) and ONNX Q/DQ, compared with the
quantized TF graph image by image."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.tfquant.test_export import IMAGE_SHAPE, _quantized_eval, _save_quantized, _synthetic_data, forward
from tfquant import fold, match
from tfquant.export import (divergence, fake_quant_graph, frozen_graph, inference_graph, model_export, onnx_export,
                            tflite_export)

INPUT_SHAPE = [None] + IMAGE_SHAPE
CONFIG = tfquant.QuantConfig(weight_bits=8, activation_bits=8, quantize_all_layers=True,
                             weight_scheme="symmetric", fold_batch_norms=True)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("deploy")
    rng = np.random.default_rng(5)
    checkpoint, report_path = _save_quantized(str(directory), CONFIG, rng, train_steps=60)
    report = tfquant.report.load_report(report_path)
    images, labels = _synthetic_data(np.random.default_rng(11), 400)
    calibration, _ = _synthetic_data(np.random.default_rng(12), 100)
    reference, quantized_weights = _quantized_eval(checkpoint, CONFIG, images)
    folded = frozen_graph.folded_weight_values(forward, checkpoint, INPUT_SHAPE)
    packed = str(directory / "model.tfq")
    model_export.pack_checkpoint(checkpoint, report, packed, folded_weights=folded)
    weights, _ = model_export.load_packed_weights(packed)
    graph = fake_quant_graph.build(forward, weights, report, INPUT_SHAPE, calibration)
    return dict(checkpoint=checkpoint, report=report, images=images, labels=labels, reference=reference,
                quantized_weights=quantized_weights, weights=weights, graph=graph)


def _agreement(logits, reference):
    return float(np.mean(np.argmax(logits, 1) == np.argmax(reference, 1)))


def test_packed_folded_weights_reload_the_trained_grid(deployed):
    """The packed file holds the folded, symmetric-quantized weights the eval graph multiplies by."""
    for name, trained in deployed["quantized_weights"].items():
        np.testing.assert_array_equal(deployed["weights"][name], trained)
        level = 127
        step = np.abs(trained).max() / level
        codes = trained / step
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)  # zero point 0, +-127
    frozen = frozen_graph.freeze_inference_graph(forward, deployed["weights"], deployed["report"], INPUT_SHAPE)
    logits = frozen_graph.run_graph_def(frozen, deployed["images"])
    np.testing.assert_allclose(logits, deployed["reference"], rtol=1e-4, atol=1e-4)


def test_fake_quant_graph_carries_trained_ranges(deployed):
    graph = deployed["graph"]
    # Symmetric 8-bit per-layer weights are exactly what an int8 kernel stores: the FakeQuant changes none.
    assert [w["int8"] for w in graph.weights] == ["exact"] * 4
    imported = tf.Graph()
    with imported.as_default():
        tf.compat.v1.import_graph_def(graph.graph_def, name="")
    variables = {layer.name: layer.weight_variable for layer in deployed["report"].weight_layers}
    with tf.compat.v1.Session(graph=imported) as sess:
        for record in graph.weights:
            fake_quantized = sess.run(record["tensor"])
            trained = deployed["weights"][variables[record["layer"]]]
            np.testing.assert_allclose(fake_quantized, trained, rtol=0, atol=1e-6 * np.abs(trained).max())
    trained = [r for r in graph.activations if r["source"] == "trained"]
    report = deployed["report"]
    quantized_acts = [layer for layer in report.activation_layers if layer.quantized]
    assert len(trained) == len(quantized_acts) == 3
    for record, layer in zip(trained, quantized_acts):
        low, high = layer.range_variables
        assert record["max"] == pytest.approx(float(deployed["weights"][high]))
        assert record["min"] == pytest.approx(min(0.0, float(deployed["weights"][low])))
    # What training never quantized is labelled as calibrated: the input and the logits.
    calibrated = {r["tensor"] for r in graph.activations if r["source"] == "calibrated"}
    assert inference_graph.INPUT_NAME in calibrated and any("fc2" in name for name in calibrated)
    # A folded conv feeds its bias, then a trained ReLU range: nothing in between is requantized.
    assert len(calibrated) == 2, calibrated
    logits = frozen_graph.run_graph_def(graph.graph_def, deployed["images"])
    assert _agreement(logits, deployed["reference"]) >= 0.997


def test_int8_tflite_from_trained_ranges_agrees_with_quantized_graph(deployed):
    model = tflite_export.convert_int8_trained(deployed["graph"], INPUT_SHAPE)
    interpreter = tflite_export.make_interpreter(model)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    scales = [d["quantization"][0] for d in interpreter.get_tensor_details()]
    for record in deployed["graph"].activations:
        if record["source"] == "trained":  # the int8 tensor's scale is the trained range's
            want = (record["max"] - record["min"]) / 255.0
            assert min(abs(s - want) for s in scales) <= 1e-6 * want
    logits = tflite_export.run_tflite(model, deployed["images"])
    assert _agreement(logits, deployed["reference"]) >= 0.997
    accuracy = np.mean(np.argmax(logits, 1) == deployed["labels"])
    reference_accuracy = np.mean(np.argmax(deployed["reference"], 1) == deployed["labels"])
    assert abs(accuracy - reference_accuracy) <= 0.005


def _onnx_installed():
    return onnx_export.available()


def test_onnx_qdq_agrees_with_quantized_graph(deployed):
    if not _onnx_installed():
        pytest.skip("tf2onnx / onnxruntime not installed (pip install -e '.[onnx]')")
    import onnx
    model = onnx_export.convert(deployed["graph"].graph_def)
    quantize, dequantize = onnx_export.quantize_linear_pairs(model)
    # Every activation range is a QuantizeLinear/DequantizeLinear pair.
    assert quantize == dequantize == len(deployed["graph"].activations)
    # Every weight is stored as its trained integer codes (zero point 0 after the uint8 offset), which
    # dequantize to the trained weight: onnxruntime has no float weight to quantize again on its own grid.
    codes = onnx_export.weight_codes(model)
    trained = [np.sort(np.ravel(deployed["weights"][layer.weight_variable]))
               for layer in deployed["report"].weight_layers if layer.quantized]
    assert len(codes) == len(trained) == 4, sorted(codes)
    for stored, scale, axis in codes.values():
        assert stored.dtype == np.int32 and np.abs(stored).max() == 127
        shape = [1] * stored.ndim
        if axis is not None:
            shape[axis] = -1
        values = np.sort(np.ravel(stored * np.reshape(scale, shape)))
        assert min(np.abs(values - t).max() if t.shape == values.shape else np.inf for t in trained) <= 1e-6
    proto = onnx.load_from_string(model)
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    scales = [float(v) for node in proto.graph.node if node.op_type == "QuantizeLinear"
              for v in np.ravel(initializers.get(node.input[1], []))]
    for record in deployed["graph"].activations:
        if record["source"] == "trained":
            want = (record["max"] - record["min"]) / 255.0
            assert min(abs(s - want) for s in scales) <= 1e-6 * want
    logits = onnx_export.run_onnx(model, deployed["images"])
    assert _agreement(logits, deployed["reference"]) >= 0.997


def test_trained_range_export_refuses_layers_above_8_bits(deployed):
    data = deployed["report"].to_dict()
    layer = next(entry for entry in data["layers"] if entry["name"] == "Relu_2")
    layer["bits"] = 12
    with pytest.raises(ValueError, match=r"activation layer Relu_2 uses 12 bits"):
        fake_quant_graph.build(forward, deployed["weights"], data, INPUT_SHAPE, deployed["images"][:4])


@pytest.mark.parametrize("scheme, bucket_type, verdict", [
    ("symmetric", None, "exact"), ("symmetric", "channel", "exact"), ("asymmetric", None, "rounded")])
def test_k_bit_weights_below_8_bits_exact_only_on_the_symmetric_grid(scheme, bucket_type, verdict):
    from tfquant.report import QUANTIZED, LayerReport
    rng = np.random.default_rng(3)
    graph = tf.Graph()
    with graph.as_default():
        steps = rng.uniform(0.01, 0.1, size=4).astype(np.float32) if bucket_type else np.float32(0.05)
        value = (rng.integers(-7, 8, size=(3, 3, 2, 4)) * steps).astype(np.float32)  # a 4-bit symmetric grid
        value[0, 0, 0, :] = 7 * steps  # every group reaches +-(2^(k-1)-1)
        conv = tf.nn.conv2d(tf.zeros([1, 5, 5, 2]), tf.constant(value), 1, "SAME")
        layer = LayerReport(name=conv.op.name, op_type="Conv2D", kind="weight", status=QUANTIZED, bits=4,
                            bucket_type=bucket_type)
        record, replaced = fake_quant_graph._weight_fake_quant(conv.op, 1, value, layer, scheme)
        with tf.compat.v1.Session() as sess:
            fake_quantized = sess.run(record["tensor"])
    assert record["int8"] == verdict and record["bits"] == (4 if verdict == "exact" else 8)
    assert replaced == {} and "deployed_as" not in record
    if verdict == "exact":  # the k-bit FakeQuant's grid is the trained one: nothing moves
        np.testing.assert_allclose(fake_quantized, value, rtol=0, atol=1e-6)
    else:
        assert record["reason"] == "asymmetric grid"


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("bucket_type", ["channel", None])
def test_matmul_with_channel_ranges_deploys_as_a_1x1_convolution(transpose_b, bucket_type):
    from tfquant.report import QUANTIZED, LayerReport
    rng = np.random.default_rng(4)
    steps = rng.uniform(0.01, 0.1, size=5).astype(np.float32) if bucket_type else np.float32(0.05)
    value = (rng.integers(-7, 8, size=(6, 5)) * steps).astype(np.float32)  # a 4-bit symmetric grid, [C, K]
    value[0, :] = -7 * steps
    x_value = rng.normal(size=(3, 6)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.constant(x_value)
        stored = value.T.copy() if transpose_b else value
        product = tf.matmul(x, tf.constant(stored), transpose_b=transpose_b)
        reader = tf.identity(product)
        layer = LayerReport(name=product.op.name, op_type="MatMul", kind="weight", status=QUANTIZED, bits=4,
                            bucket_type=bucket_type)
        record, replaced = fake_quant_graph._weight_fake_quant(product.op, 1, stored, layer, "symmetric")
        with tf.compat.v1.Session() as sess:
            kernel, output = sess.run([record["tensor"], reader])
    assert record["int8"] == "exact" and record["bits"] == 4 and record["reason"] == ""
    if bucket_type == "channel":
        # The int8 kernel holds one range per output channel: the MatMul now runs as a 1x1 convolution whose
        # kernel carries the trained grid unchanged, and the MatMul's reader reads the convolution.
        assert record["deployed_as"] == "1x1 Conv2D" and list(replaced) == [product.name]
        np.testing.assert_allclose(kernel, value.reshape(1, 1, 6, 5), rtol=0, atol=1e-6)
        assert reader.op.inputs[0] is replaced[product.name]
    else:  # one range for the whole layer: the MatMul keeps it
        assert "deployed_as" not in record and replaced == {}
        assert reader.op.inputs[0] is product
    np.testing.assert_allclose(output, x_value.astype(np.float64) @ value, rtol=1e-5, atol=1e-5)


def _convnet_forward_eval(images):
    from nets import convnet, model_helper
    with tf.compat.v1.variable_scope(model_helper.MODEL_SCOPE, reuse=tf.compat.v1.AUTO_REUSE):
        return convnet.forward_convnet(images, False, 10)


def _convnet_run(directory):
    """A quantized ConvNet run directory (symmetric W8A8, every layer) as a uniform run leaves it: checkpoint,
    report and inference graph."""
    import os
    from nets import convnet, model_helper
    from tfquant.export import inference_graph
    config = tfquant.QuantConfig(weight_bits=8, activation_bits=8, quantize_all_layers=True,
                                 weight_scheme="symmetric", use_buckets=True, bucket_type="channel")
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(1)
        images = tf.compat.v1.placeholder(tf.float32, [None, 28, 28, 1])
        with tf.compat.v1.variable_scope(model_helper.MODEL_SCOPE):
            logits = convnet.forward_convnet(images, True, 10)
        report = tfquant.quantize_graph(graph, config, is_training=True)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(logits, {images: np.random.default_rng(0).uniform(-1, 1, (16, 28, 28, 1))})
            saver.save(sess, os.path.join(str(directory), "model.ckpt"), global_step=1)
    (directory / "quant_report.json").write_text(report.to_json())
    inference_graph.save_inference_graph(str(directory), _convnet_forward_eval, [None, 28, 28, 1])
    return config


def _convnet_npz(path):
    """The first 32 Fashion-MNIST test images and 200 training images as the ConvNet's pipelines give them."""
    from learners.runner import dataset_arrays
    from nets.convnet_at_fmnist import ModelHelper
    helper = ModelHelper(batch_size=100, batch_size_eval=32, eval_subset=32, seed=0)
    images, labels = dataset_arrays(helper, evaluation=True)
    calibration, _ = dataset_arrays(helper, evaluation=False, limit=200)
    np.savez(path, x_test=images, y_test=labels, x_train=calibration)
    return images, labels


def test_cli_int8_and_onnx_record_agreement_with_the_quantized_graph(tmp_path, capsys):
    import json
    from tfquant.export import __main__ as cli
    from tfquant.export import run_directory
    run = tmp_path / "run"
    run.mkdir()
    config = _convnet_run(run)
    images, labels = _convnet_npz(tmp_path / "data.npz")
    out = tmp_path / "export"
    onnx = ["--onnx"] if _onnx_installed() else []  # the int8 part runs without the optional packages
    status = cli.main(["--checkpoint_dir", str(run), "--output_dir", str(out), "--eval_npz", str(tmp_path / "data.npz"),
                       "--int8", "--latency_images", "3"] + onnx)
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "agreement with TF graph" in printed.out and "load average" in printed.out
    result = json.loads((out / "export.json").read_text())
    assert "trained ranges" in result["int8"]["activation_ranges"] and result["int8"]["calibration_images"] == 200
    # k <= 8-bit symmetric channel grids are exact on the convolutions, and on the MatMuls, which run as
    # 1x1 convolutions (TFLite's FullyConnected weight takes one range).
    verdicts = {w["layer"]: (w["int8"], w["reason"], w.get("deployed_as"))
                for w in result["trained_ranges"]["weights"]}
    assert verdicts["model/conv1/Conv2D"] == verdicts["model/conv2/Conv2D"] == ("exact", "", None)
    assert verdicts["model/fc3/MatMul"] == verdicts["model/fc4/MatMul"] == ("exact", "", "1x1 Conv2D")
    # The int8 file's kernels are the trained weights: int8 values times their per-channel scales.
    packed, _ = model_export.load_packed_weights(str(out / "model.tfq"))
    trained = {np.asarray(v).shape[::-1]: np.asarray(v) for k, v in packed.items() if np.asarray(v).ndim == 2}
    interpreter = tflite_export.make_interpreter(str(out / "model_int8.tflite"))
    kernels = 0
    for detail in interpreter.get_tensor_details():
        shape = tuple(detail["shape"])
        scales = detail["quantization_parameters"]["scales"]
        if len(shape) == 4 and shape[1:3] == (1, 1) and (shape[0], shape[3]) in trained and len(scales) > 1:
            values = interpreter.get_tensor(detail["index"]).astype(np.float64) * scales[:, None, None, None]
            np.testing.assert_allclose(values.reshape(shape[0], shape[3]).T, trained[(shape[0], shape[3])],
                                       rtol=1e-5, atol=1e-7)
            kernels += 1
    assert kernels == 2
    load = result["latency"]["load_average_1_5_15_min"]
    assert len(load["before"]) == 3 and all(value >= 0 for value in load["before"])
    assert set(result["latency"]) >= {"float", "int8", "float_builtin_kernels"} | ({"onnx"} if onnx else set())
    counts = {label: t["count"] for label, t in result["latency"].items() if isinstance(t, dict) and "count" in t}
    assert set(counts.values()) == {9}, counts  # 3 images x 3 passes, every model alike
    assert result["latency"]["int8_over_float_builtin_median"] == pytest.approx(
        result["latency"]["int8"]["median_ms"] / result["latency"]["float_builtin_kernels"]["median_ms"])
    # Recompute every file's agreement from the files themselves and the checkpoint's quantized graph, built
    # from the model code (not from the saved inference graph the export used).
    checkpoint = model_export.resolve_checkpoint(str(run))
    reference = run_directory._quantized_checkpoint_logits(
        _convnet_forward_eval, checkpoint,
        tfquant.report.config_from_report(tfquant.report.load_report(str(run / "quant_report.json"))),
        images).argmax(1)
    predictions = {"tflite_int8": tflite_export.run_tflite(str(out / "model_int8.tflite"), images),
                   "tflite_float": tflite_export.run_tflite(str(out / "model_float.tflite"), images)}
    if onnx:
        predictions["onnx"] = onnx_export.run_onnx((out / "model.onnx").read_bytes(), images)
    for label, logits in predictions.items():
        agreement = float(np.mean(logits.argmax(1) == reference))
        assert result["agreement_with_quantized_tf"][label] == agreement, label
        assert result["accuracy"][label] == float(np.mean(logits.argmax(1) == labels)), label
    assert result["agreement_with_quantized_tf"]["frozen_graph"] == 1.0
    assert result["agreement_with_quantized_tf"]["tflite_int8"] >= 0.95
    assert config.weight_scheme == result["config"]["weight_scheme"]


def _preprocessed_forward(images, is_training=False):
    """The test model behind in-graph preprocessing, whose output the int8 model holds before conv1."""
    return forward(images * 0.5 - 0.25, is_training)


def test_export_calibrates_the_tensors_training_would_quantize(tmp_path):
    checkpoint, report_path = _save_quantized(str(tmp_path), CONFIG, np.random.default_rng(1),
                                              forward_fn=_preprocessed_forward)
    report = tfquant.report.load_report(report_path)
    folded = frozen_graph.folded_weight_values(_preprocessed_forward, checkpoint, INPUT_SHAPE)
    packed = str(tmp_path / "model.tfq")
    model_export.pack_checkpoint(checkpoint, report, packed, folded_weights=folded)
    weights, _ = model_export.load_packed_weights(packed)
    images, _ = _synthetic_data(np.random.default_rng(2), 50)
    built = fake_quant_graph.build(_preprocessed_forward, weights, report, INPUT_SHAPE, images)
    calibrated = {r["tensor"]: r for r in built.activations if r["source"] == "calibrated"}
    # One definition: the image input plus what tfquant.match.find_integer_tensors names for this model.
    graph = tf.Graph()
    with graph.as_default():
        _preprocessed_forward(tf.compat.v1.placeholder(tf.float32, INPUT_SHAPE))
        # As the export builds it: the checkpoint's weights already hold W * gamma / sigma.
        outputs = fold.fold_batch_norms(graph, is_training=False, weights_folded=True).outputs
        candidates = [c for c in match.find_weight_candidates(graph) if c.input_index is not None]
        covered = {layer.name for layer in report.activation_layers if layer.quantized}
        found = match.find_integer_tensors(graph, candidates, covered, outputs)
    assert set(calibrated) == {inference_graph.INPUT_NAME} | {item.tensor.op.name for item in found}
    # The preprocessed image conv1 reads is among them, with its range over the calibration images.
    data, = [item for item in found if item.op_type == "Input"]
    record = calibrated[data.tensor.op.name]
    preprocessed = images * 0.5 - 0.25
    assert record["min"] == pytest.approx(min(0.0, float(preprocessed.min())), rel=1e-6)
    assert record["max"] == pytest.approx(max(0.0, float(preprocessed.max())), rel=1e-6)


def _builtin_kernel_logits(model, images):
    interpreter = tflite_export.make_interpreter(model, default_delegates=False)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(images.shape))
    interpreter.allocate_tensors()
    detail, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.set_tensor(index, np.clip(np.round(images / detail["quantization"][0]) + detail["quantization"][1],
                                          -128, 127).astype(np.int8))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]).astype(np.int64), out["quantization"]


def test_layer_divergence_compares_every_int8_tensor_with_the_tf_graph(deployed):
    model = tflite_export.convert_int8_trained(deployed["graph"], INPUT_SHAPE)
    images = deployed["images"][:64]
    records = divergence.layer_divergence(deployed["graph"].graph_def, model, images)
    interpreter = tflite_export.make_interpreter(model)
    int8_outputs = sum(1 for op in interpreter._get_ops_details() for index in op["outputs"]
                       if interpreter.get_tensor_details()[index]["dtype"] == np.int8)
    assert len(records) == int8_outputs + 1 and records[0]["op"] == divergence.INPUT
    assert all(r["tensor"] is not None and 0 <= r["differ"] <= 1 for r in records), records
    assert records[0]["differ"] == 0  # the input is quantized the same way on both sides
    # The output's share, recomputed from the model's int8 logits and the frozen graph's logits.
    codes, (scale, zero_point) = _builtin_kernel_logits(model, images)
    graph_logits = frozen_graph.run_graph_def(deployed["graph"].graph_def, images)
    graph_codes = np.clip(np.round(graph_logits.astype(np.float64) / scale) + zero_point, -128, 127)
    assert records[-1]["differ"] == pytest.approx(np.mean(graph_codes != codes.reshape(graph_codes.shape)))
    assert records[-1]["max_steps"] == np.abs(graph_codes - codes.reshape(graph_codes.shape)).max()

    # A graph whose first ReLU range is 0.77 as wide: that tensor's nonzero codes move, the input's do not.
    changed = tf.compat.v1.GraphDef()
    changed.CopyFrom(deployed["graph"].graph_def)
    nodes = {node.name: node for node in changed.node}
    first = next(r["tensor"] for r in records[1:] if "Relu" in r["tensor"]).split(":")[0]
    high = nodes[nodes[first].input[2]]
    value = tf.make_ndarray(high.attr["value"].tensor)
    high.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value * 0.77))
    broken = {r["tensor"]: r for r in divergence.layer_divergence(changed, model, images)}
    assert broken[records[0]["tensor"]]["differ"] == 0
    before = next(r["differ"] for r in records if r["tensor"] == first + ":0")
    assert broken[first + ":0"]["differ"] > max(0.05, 10 * before), (broken[first + ":0"], before)


def test_export_names_what_its_int8_files_do_not_hold_as_trained(deployed):
    from tfquant.export import run_directory
    graph = deployed["graph"]
    # Symmetric weights at 8 bits: all exact. The input and the logits were never quantized in training
    # (quantize_layer_outputs off): calibrated, and named.
    calibrated = [r["tensor"] for r in graph.activations if r["source"] == "calibrated"]
    assert "input" in calibrated and {w["int8"] for w in graph.weights} == {"exact"}
    untrained = graph.not_as_trained()
    assert untrained == {"calibrated": calibrated}
    line = run_directory.summary_lines({"packed": {"file_bytes": 1, "bound_bytes": 1, "float_storage_bits": 8,
                                                   "compression_ratio": 1.0}, "files": {},
                                        "not_as_trained": untrained}, "out")[-2]
    assert line.startswith("warning: the int8 / ONNX files do not compute the trained graph exactly: %d ranges "
                           "calibrated that training never quantized (input" % len(calibrated))
    regridded = dict(untrained, weights={"asymmetric grid": ["a", "b", "c", "d"]})
    assert "weights re-gridded to 8-bit symmetric: a, b, c and 1 more (asymmetric grid)" in \
        run_directory.summary_lines({"packed": {"file_bytes": 1, "bound_bytes": 1, "float_storage_bits": 8,
                                                "compression_ratio": 1.0}, "files": {},
                                     "not_as_trained": regridded}, "out")[-2]
