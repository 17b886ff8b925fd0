"""k-bit ONNX export: the trained codes as UINT4/UINT2 initializers + DequantizeLinear, checked in onnxruntime.

References: the packed .tfq file's codes (written by pack_checkpoint from the checkpoint), the frozen TF graphs
the export converts (run by TensorFlow), onnxruntime with and without graph optimizations, and a NumPy
decoding of the raw initializer bytes."""
import json
import math

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.tfquant.test_export import IMAGE_SHAPE, _save_quantized, _synthetic_data, forward
from tfquant.export import frozen_graph, inference_graph, onnx_check, onnx_kbit, packed_reader, run_directory

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

tf1 = tf.compat.v1
ONNX_TYPES = {"UINT4": onnx.TensorProto.UINT4, "UINT2": onnx.TensorProto.UINT2, "UINT8": onnx.TensorProto.UINT8}
CONTAINER = {"UINT4": 4, "UINT2": 2, "UINT8": 8}


def _mlp(images, is_training=False):
    """input -> Dense(64) -> relu -> Dense(6): MatMuls whose second has N = 6, not a multiple of 4."""
    del is_training
    x = tf.reshape(images, [-1, int(np.prod(IMAGE_SHAPE))])
    for name, units in (("fc1", 64), ("fc2", 6)):
        kernel = tf1.get_variable(name + "/weights", [x.shape[-1], units],
                                  initializer=tf1.glorot_uniform_initializer())
        bias = tf1.get_variable(name + "/biases", [units], initializer=tf1.zeros_initializer())
        x = tf.nn.bias_add(tf.matmul(x, kernel), bias)
        if name == "fc1":
            x = tf.nn.relu(x)
    return x


CASES = {
    # name: (config, forward) -- activations float unless said: the file is then the frozen graph exactly.
    "w4_channel_symmetric": (dict(weight_bits=4, weight_scheme="symmetric", use_buckets=True,
                                  bucket_type="channel"), forward),
    "w3_split_minmax": (dict(weight_bits=3, use_buckets=True, bucket_type="split", bucket_size=40), forward),
    "w4_block_symmetric": (dict(weight_bits=4, weight_scheme="symmetric", use_buckets=True, bucket_type="block",
                                bucket_size=16), _mlp),
    "w2_block_lsq": (dict(weight_bits=2, weight_range="lsq", use_buckets=True, bucket_type="block",
                          bucket_size=16), _mlp),
    "w2a8_symmetric": (dict(weight_bits=2, weight_scheme="symmetric", activation_bits=8), forward),
    # Also exported with --int8: the LiteRT INT4 file.
    "w3a8_channel_symmetric": (dict(weight_bits=3, weight_scheme="symmetric", activation_bits=8, use_buckets=True,
                                    bucket_type="channel", fold_batch_norms=True), forward),
    "w2a8_channel_symmetric": (dict(weight_bits=2, weight_scheme="symmetric", activation_bits=8, use_buckets=True,
                                    bucket_type="channel", fold_batch_norms=True), forward),
}
INT8_CASES = ("w3a8_channel_symmetric", "w2a8_channel_symmetric")


def _run_directory(directory, config, forward_fn):
    checkpoint, _ = _save_quantized(str(directory), config, np.random.default_rng(5), train_steps=8,
                                    forward_fn=forward_fn)
    inference_graph.save_inference_graph(str(directory), forward_fn, [None] + IMAGE_SHAPE)
    return checkpoint


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every case exported with --onnx and the test images: {name: (run dir, export dir, export.json)}."""
    images, labels = _synthetic_data(np.random.default_rng(11), 96)
    calibration, _ = _synthetic_data(np.random.default_rng(12), 48)
    done = {}
    for name, (settings, forward_fn) in CASES.items():
        run = tmp_path_factory.mktemp(name)
        config = tfquant.QuantConfig(quantize_all_layers=True, **settings)
        _run_directory(run, config, forward_fn)
        out = run / "export"
        result = run_directory.export_run_directory(str(run), str(out), onnx=True,
                                                    int8=name in INT8_CASES, test_data=(images, labels),
                                                    calibration_images=calibration, latency_images=0)
        done[name] = (run, out, result)
    return done, images


def _codes_initializers(model, result):
    initializers = {t.name: t for t in model.graph.initializer}
    for variable, record in result["onnx"]["weights"].items():
        if record["stored_type"] != "FLOAT":
            yield variable, record, initializers[record["codes_initializer"]]


def _unpack(raw, bits, count):
    """Codes from ONNX raw data by the ONNX rule (element i in bits [i*k, (i+1)*k) little-endian), in NumPy."""
    stream = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
    return stream[:count * bits].reshape(count, bits) @ (1 << np.arange(bits))


@pytest.mark.parametrize("name", list(CASES))
def test_initializer_types_raw_lengths_and_codes(exports, name):
    (run, out, result), _ = exports[0][name], exports[1]
    model = onnx.load(str(out / "model.onnx"))
    tensors = {t.name: t for t in packed_reader.read_packed_model(str(out / "model.tfq"))[0]}
    stored = list(_codes_initializers(model, result))
    assert len(stored) == len([t for t in tensors.values() if hasattr(t, "codes")])
    for variable, record, initializer in stored:
        tensor = tensors[variable]
        container = CONTAINER[record["stored_type"]]
        assert container == {1: 2, 2: 2, 3: 4, 4: 4}.get(tensor.bits, 8)
        assert initializer.data_type == ONNX_TYPES[record["stored_type"]]
        count = int(np.prod(initializer.dims))
        assert len(initializer.raw_data) == math.ceil(count * container / 8)
        # Read with NumPy alone: the stored codes are the checkpoint's, in the order the metadata says.
        meta = next(e for e in json.loads(model.metadata_props[0].value) if e["variable"] == variable)
        flat = _unpack(initializer.raw_data, container, count)[:tensor.codes.size]
        order = meta["order"]
        decoded = flat.reshape([tensor.shape[a] for a in order]).transpose(np.argsort(order))
        np.testing.assert_array_equal(decoded, tensor.codes)
    np.testing.assert_equal(onnx_kbit.read_weight_codes(model), {v: tensors[v].codes for v, _, _ in stored})
    assert result["onnx"]["opset"] == (25 if any(r["stored_type"] == "UINT2" for _, r, _ in stored) else 21)
    # The file against the size tfquant accounts for its weights and ranges.
    accounted = tfquant.report.load_report(str(run / "quant_report.json")).total_storage_bits / 8
    assert result["files"]["onnx"]["bytes"] <= 1.10 * accounted + 16384


def test_dequantize_forms_cover_every_layout(exports):
    forms = {name: {v: r["form"] for v, r in exports[0][name][2]["onnx"]["weights"].items()} for name in CASES}
    assert set(forms["w4_channel_symmetric"].values()) == {"per_axis"}
    assert forms["w4_block_symmetric"]["fc1/weights"] == "blocked"  # [K, N] blocked along K
    assert all(f.startswith("reshaped/") for v, f in forms["w3_split_minmax"].items() if v != "fc2/weights")
    zero_points = {r["zero_point"] for r in exports[0]["w3_split_minmax"][2]["onnx"]["weights"].values()}
    assert zero_points == {"float_offset (cannot fuse)"}  # PocketFlow's min/max grid: an arbitrary minimum


@pytest.mark.parametrize("name", [n for n in CASES if "a8" not in n])
def test_onnxruntime_numerics_match_the_quantized_graph(exports, name):
    (run, out, result), images = exports[0][name], exports[1]
    reference = frozen_graph.run_graph_def(_graph_def(out / "inference.pb"), images)
    model = (out / "model.onnx").read_bytes()
    for optimize in (False, True):
        logits = onnx_check.run(onnx_check.session(model, optimize=optimize), images)
        assert np.max(np.abs(logits - reference)) <= 1e-5 * np.max(np.abs(reference))
        np.testing.assert_array_equal(logits.argmax(1), reference.argmax(1))
    assert result["agreement_with_quantized_tf"]["onnx"] == 1.0
    assert result["accuracy"]["onnx"] == result["accuracy"]["quantized_checkpoint"]


def _graph_def(path):
    graph_def = tf1.GraphDef()
    graph_def.ParseFromString(path.read_bytes())
    return graph_def


def test_matmul_nbits_fused_with_its_bits_and_block_size(exports):
    records = exports[0]["w4_block_symmetric"][2]["onnx"]["weights"]
    for variable in ("fc1/weights", "fc2/weights"):
        assert records[variable]["fused"] and records[variable]["kernel"]["bits"] == 4
        assert records[variable]["kernel"]["block_size"] == 16
    # Independently: the model onnxruntime optimizes has one MatMulNBits per MatMul, with those attributes.
    path = exports[0]["w4_block_symmetric"][1] / "optimized.onnx"
    onnx_check.session((exports[0]["w4_block_symmetric"][1] / "model.onnx").read_bytes(), optimized_path=str(path))
    kernels = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
    assert sorted({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["N"] for n in kernels) == [6, 64]
    path.unlink()


def test_two_bit_matmul_nbits_defect_is_caught_and_falls_back(exports):
    # N = 6: onnxruntime's 2-bit MatMulNBits computes wrong results; fc1 (N = 64) keeps its fused kernel.
    result = exports[0]["w2_block_lsq"][2]["onnx"]
    assert "disagree" in result["check"]["first_attempt"]
    assert result["weights"]["fc2/weights"]["fallback"] and not result["weights"]["fc2/weights"]["fused"]
    assert result["weights"]["fc2/weights"]["stored_type"] == "UINT2"
    assert result["weights"]["fc1/weights"]["fused"] and result["weights"]["fc1/weights"]["kernel"]["bits"] == 2
    assert result["check"]["relative_difference"] <= 1e-5


def test_two_bit_qdq_convolution_runs_as_written(exports):
    """A 2-bit Q/DQ convolution failed to load at full optimization, where onnxruntime fused it into an integer
    kernel (the check caught it and stored the layer in a form it does not fuse). With each activation's trained
    rounding before its QuantizeLinear (onnx_snap) and the weights' trained values (zero point 0 + beta) nothing
    is fused into that kernel: the file runs as written, every weight in UINT2, no fallback."""
    (run, out, result), images = exports[0]["w2a8_symmetric"], exports[1]
    record = result["onnx"]
    assert record["check"]["first_attempt"] == "passed" and not record["fallbacks"]
    assert all(weight["stored_type"] == "UINT2" for weight in record["weights"].values())
    model = (out / "model.onnx").read_bytes()
    plain = onnx_check.run(onnx_check.session(model, optimize=False), images)
    optimized = onnx_check.run(onnx_check.session(model, optimize=True), images)
    np.testing.assert_array_equal(optimized, plain)
    assert result["agreement_with_quantized_tf"]["onnx"] >= 0.95


def test_litert_int4_file_holds_the_trained_codes_and_agrees(exports):
    from tfquant.export import tflite_export, tflite_int4
    (run, out, result), images = exports[0]["w3a8_channel_symmetric"], exports[1]
    assert (out / "model_int4.tflite").exists() and result["files"]["tflite_int4"]["bytes"] > 0
    records = {r["layer"]: r for r in result["int4"]["weights"] if r["layer"]}
    assert {r["operator"] for r in records.values()} == {"CONV_2D"}  # the MatMuls run as 1x1 convolutions
    assert all(r["stored"] == "INT4" and r["reason"] == "" for r in records.values())
    # Read back with NumPy: every INT4 weight is its layer's trained signed code (code - 3), in OHWI order.
    report = tfquant.report.load_report(str(run / "quant_report.json"))
    packed = {t.name: t for t in packed_reader.read_packed_model(str(out / "model.tfq"))[0]}
    variables = {layer.name: layer.weight_variable for layer in report.weight_layers}
    # Each output channel's codes times the largest integer keeping them in -7..7 (2 for 3-bit codes reaching 3).
    stored = tflite_int4.int4_weight_codes((out / "model_int4.tflite").read_bytes())
    trained = {}
    for layer, record in records.items():
        codes = packed[variables[layer]].codes.astype(np.int64) - 3
        expected = codes.transpose(3, 0, 1, 2) if codes.ndim == 4 else codes.T.reshape(-1, 1, 1, codes.shape[0])
        top = np.abs(expected).reshape(len(expected), -1).max(axis=1)
        multiplier = np.maximum(7 // np.maximum(top, 1), 1).reshape(-1, 1, 1, 1)
        assert record["code_multiplier"] == sorted(set(multiplier.reshape(-1).tolist()))
        np.testing.assert_array_equal(stored[record["tensor"]], expected * multiplier)
        trained[record["tensor"]] = expected
    # 3-bit codes the converter had moved onto a 4-bit grid, put back on the trained one in the int8 file.
    assert any(r.get("converter_requantized") for r in result["int8"]["weights"])
    # The int8 file holds the same trained codes as int8 (the converter had written them INT4, off the grid).
    from ai_edge_litert import schema_py_generated as schema
    int8_model = schema.ModelT.InitFromPackedBuf(bytearray((out / "model_int8.tflite").read_bytes()), 0)
    int8_weights = {t.name.decode(): np.frombuffer(bytes(bytearray(int8_model.buffers[t.buffer].data)), np.int8)
                    for t in int8_model.subgraphs[0].tensors
                    if t.type == schema.TensorType.INT8 and int8_model.buffers[t.buffer].data is not None}
    for layer, record in records.items():
        # The same trained codes, times 127 // max|code| of their channel.
        expected = trained[record["tensor"]]
        top = np.abs(expected).reshape(len(expected), -1).max(axis=1)
        multiplier = np.maximum(127 // np.maximum(top, 1), 1).reshape(-1, 1, 1, 1)
        np.testing.assert_array_equal(int8_weights[record["tensor"]], (expected * multiplier).reshape(-1))
    assert result["int4"]["bytes_over_int8"] < 0.75
    # The interpreter runs it; it predicts as the quantized TF graph at least as often as the int8 file.
    logits = tflite_export.run_tflite((out / "model_int4.tflite").read_bytes(), images)
    agreement = result["agreement_with_quantized_tf"]
    assert agreement["tflite_int4"] >= max(0.95, agreement["tflite_int8"])
    assert np.mean(logits.argmax(1) == np.asarray(
        tflite_export.run_tflite((out / "model_int8.tflite").read_bytes(), images)).argmax(1)) >= 0.9


def test_summary_lines_say_what_the_k_bit_files_hold(exports):
    (run, out, result), _ = exports[0]["w3a8_channel_symmetric"], exports[1]
    lines = run_directory.summary_lines(result, str(out))
    weights = result["onnx"]["weights"]
    assert "k-bit ONNX (opset 21): weights %d UINT4; 0 fused into MatMulNBits; 0 fallbacks" % len(weights) in \
        "\n".join(lines)
    assert "model_int4.tflite: 4 weights INT4, 0 int8" in "\n".join(lines)


def test_a_file_onnxruntime_never_runs_as_written_is_refused(exports, tmp_path, monkeypatch):
    (run, _, _), images = exports[0]["w4_block_symmetric"], exports[1]
    calls = []

    def always_disagrees(model, check_images, codes_names=()):
        calls.append(len(check_images))
        return {"ok": False, "reason": "logits differ", "relative_difference": 1.0, "top1_agreement": 0.0,
                "logits": None, "fused": {}}

    monkeypatch.setattr(onnx_check, "check", always_disagrees)
    out = tmp_path / "export"
    with pytest.raises(run_directory.ExportError, match="k-bit ONNX model is not valid: logits differ"):
        run_directory.export_run_directory(str(run), str(out), onnx=True, test_data=(images, np.zeros(len(images),
                                                                                                       np.int64)),
                                           latency_images=0)
    assert not out.exists()  # nothing written
    assert len(calls) == 3  # as written, every layer in the non-fusing form, every layer in 8-bit containers


def _conv_biases(model):
    """[(int32 bias values, float64 scales)] of a flatbuffer model's CONV_2D operators, in order."""
    found = []
    graph = model.subgraphs[0]
    for operator in graph.operators:
        if len(operator.inputs) > 2 and graph.tensors[operator.inputs[1]].shape is not None and \
                len(graph.tensors[operator.inputs[1]].shape) == 4:
            bias = graph.tensors[operator.inputs[2]]
            found.append((np.frombuffer(bytes(bytearray(model.buffers[bias.buffer].data)), np.int32).astype(np.int64),
                          np.asarray(bias.quantization.scale, np.float64)))
    return found


def _convolution_code_errors(model_bytes, images, bias_model_bytes):
    """Per CONV_2D of a .tflite file run on LiteRT's built-in kernels (which run every INT4 convolution): the share
    of its output codes that differ from NumPy's requantization of the same int8 inputs, and the largest difference.

    NumPy: acc = sum (input code - input zero point) * weight code + int32 bias, in int64; output code
    floor(acc * input scale * weight scale / output scale + 0.5) + zero point (float64), clipped, ReLU fused. The
    bias is bias_model_bytes' (the int8 file's), put on this file's bias scale: the trained bias, whatever
    offset this file's own holds for its runtime."""
    from ai_edge_litert import schema_py_generated as schema
    from tfquant.export import tflite_export, tflite_int4
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    graph = model.subgraphs[0]
    interpreter = tflite_export.make_interpreter(model_bytes, default_delegates=False, preserve_all_tensors=True)
    interpreter.resize_tensor_input(0, list(images.shape))
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], tflite_export.quantize_input(images, detail))
    interpreter.invoke()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    trained_biases = _conv_biases(schema.ModelT.InitFromPackedBuf(bytearray(bias_model_bytes), 0))
    found = []
    for number, op in enumerate(interpreter._get_ops_details()):  # pylint: disable=protected-access
        if op["op_name"] != "CONV_2D":
            continue
        data_index, weight_index, bias_index = op["inputs"][:3]
        weight = graph.tensors[weight_index]
        raw = bytes(bytearray(model.buffers[weight.buffer].data))
        if weight.type == schema.TensorType.INT4:
            codes = tflite_int4._unpack_int4(raw, weight.shape)  # pylint: disable=protected-access
        else:
            codes = np.frombuffer(raw, np.int8).reshape(weight.shape).astype(np.int64)
        values, scales = trained_biases[len(found)]
        bias = np.round(values * scales / np.asarray(graph.tensors[bias_index].quantization.scale, np.float64))
        data = interpreter.get_tensor(data_index).astype(np.int64)
        in_scale, in_zero = details[data_index]["quantization"]
        out = interpreter.get_tensor(op["outputs"][0]).astype(np.int64)
        out_scale, out_zero = details[op["outputs"][0]]["quantization"]
        options = graph.operators[number].builtinOptions
        stride, (size_h, size_w) = options.strideH, codes.shape[1:3]
        height, width = out.shape[1:3]
        pad_h = max((height - 1) * stride + size_h - data.shape[1], 0)
        pad_w = max((width - 1) * stride + size_w - data.shape[2], 0)
        padded = np.pad(data - in_zero, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                                         (0, 0)))
        acc = np.zeros(out.shape, np.int64) + bias.astype(np.int64)
        for row in range(size_h):
            for column in range(size_w):
                window = padded[:, row:row + stride * height:stride, column:column + stride * width:stride, :]
                acc += np.einsum("nhwc,oc->nhwo", window, codes[:, row, column, :])
        scales = np.float64(in_scale) * np.asarray(weight.quantization.scale, np.float64) / np.float64(out_scale)
        expected = np.clip(np.floor(acc * scales + 0.5) + out_zero, -128, 127)
        if options.fusedActivationFunction == schema.ActivationFunctionType.RELU:
            expected = np.maximum(expected, out_zero)
        found.append((float(np.mean(expected != out)), int(np.max(np.abs(expected - out))), out.size))
    return found


@pytest.mark.parametrize("name", INT8_CASES)
def test_litert_files_requantize_their_convolutions_as_numpy(exports, name):
    # LiteRT runs INT4 convolutions on its built-in kernels only, whose fixed-point requantization rounds twice: with
    # a 2-bit weight's large step (M = input x weight / output step about 0.3) that put 8 % of the first layer's
    # codes and 6 % of all convolution outputs one step off here. Stored codes times a multiplier and, under a fused
    # ReLU, a bias one accumulator unit lower leave 1.3 %; the int8 file (127 // max|code|) almost none.
    (run, out, result), images = exports[0][name], exports[1]
    for file_name in ("model_int4.tflite", "model_int8.tflite"):
        errors = _convolution_code_errors((out / file_name).read_bytes(), images[:32],
                                          (out / "model_int8.tflite").read_bytes())
        assert len(errors) == 4, file_name
        pooled = sum(share * count for share, _, count in errors) / sum(count for _, _, count in errors)
        assert pooled <= 0.02 and all(share <= 0.05 and largest <= 1 for share, largest, _ in errors), (
            file_name, errors)
    # Its predictions: the quantized TF graph's class as often as the int8 file's, any other within one step.
    agreement = result["agreement_with_quantized_tf"]
    assert agreement["tflite_int4"] >= agreement["tflite_int8"]
    assert (result["disagreements_with_quantized_tf"]["tflite_int4"]["max_tf_margin"] or 0) <= 1
