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
}


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
                                                    int8=name == "w3a8_channel_symmetric", test_data=(images, labels),
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


def test_two_bit_qdq_convolution_failure_is_caught_and_falls_back(exports):
    (run, out, result), images = exports[0]["w2a8_symmetric"], exports[1]
    record = result["onnx"]
    assert "fails with all optimizations" in record["check"]["first_attempt"]
    fallen = {f["variable"] for f in record["fallbacks"]}
    assert fallen and all(record["weights"][v]["stored_type"] == "UINT2" for v in fallen)
    model = (out / "model.onnx").read_bytes()
    plain = onnx_check.run(onnx_check.session(model, optimize=False), images)
    optimized = onnx_check.run(onnx_check.session(model, optimize=True), images)
    np.testing.assert_array_equal(optimized.argmax(1), plain.argmax(1))
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
    stored = tflite_int4.int4_weight_codes((out / "model_int4.tflite").read_bytes())
    for layer, record in records.items():
        codes = packed[variables[layer]].codes.astype(np.int64) - 3
        expected = codes.transpose(3, 0, 1, 2) if codes.ndim == 4 else codes.T.reshape(-1, 1, 1, codes.shape[0])
        np.testing.assert_array_equal(stored[record["tensor"]], expected)
    # 3-bit codes the converter had moved onto a 4-bit grid, put back on the trained one in the int8 file.
    assert any(r.get("converter_requantized") for r in result["int8"]["weights"])
    # The int8 file holds the same trained codes as int8 (the converter had written them INT4, off the grid).
    from ai_edge_litert import schema_py_generated as schema
    int8_model = schema.ModelT.InitFromPackedBuf(bytearray((out / "model_int8.tflite").read_bytes()), 0)
    int8_weights = {t.name.decode(): np.frombuffer(bytes(bytearray(int8_model.buffers[t.buffer].data)), np.int8)
                    for t in int8_model.subgraphs[0].tensors
                    if t.type == schema.TensorType.INT8 and int8_model.buffers[t.buffer].data is not None}
    for layer, record in records.items():
        np.testing.assert_array_equal(int8_weights[record["tensor"]], stored[record["tensor"]].reshape(-1))
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
