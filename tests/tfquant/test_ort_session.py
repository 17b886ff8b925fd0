"""tfquant.export.ort_session: the onnxruntime options tfquant runs and recommends, on a small blocked 4-bit
MatMul checked against NumPy."""
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402  pylint: disable=wrong-import-position

from tfquant.export import onnx_check, onnx_export, ort_session  # noqa: E402  pylint: disable=wrong-import-position

K, N, BLOCK = 64, 16, 32


@pytest.fixture(scope="module")
def blocked_model():
    """(serialized model, codes, zero points, scales, bias): input [B, K] @ DequantizeLinear(UINT4 [K, N],
    blocks of 32 along K) + bias, the form tfquant's k-bit export writes for a MatMul."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(K, N)).astype(np.uint8)
    zeros = rng.integers(0, 16, size=(K // BLOCK, N)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(K // BLOCK, N)).astype(np.float32)
    bias = rng.normal(size=N).astype(np.float32)
    initializers = [helper.make_tensor("codes", TensorProto.UINT4, [K, N], codes.ravel().tolist()),
                    helper.make_tensor("zeros", TensorProto.UINT4, [K // BLOCK, N], zeros.ravel().tolist()),
                    helper.make_tensor("scales", TensorProto.FLOAT, [K // BLOCK, N], scales.ravel().tolist()),
                    helper.make_tensor("bias", TensorProto.FLOAT, [N], bias.tolist())]
    nodes = [helper.make_node("DequantizeLinear", ["codes", "scales", "zeros"], ["weight"], axis=0,
                              block_size=BLOCK),
             helper.make_node("MatMul", ["input", "weight"], ["product"]),
             helper.make_node("Add", ["product", "bias"], ["logits"])]
    graph = helper.make_graph(nodes, "blocked", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, N])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString(), codes, zeros, scales, bias


def _reference(images, codes, zeros, scales, bias):
    blocks = np.arange(K) // BLOCK
    weight = (codes.astype(np.float64) - zeros[blocks].astype(np.float64)) * scales[blocks].astype(np.float64)
    return images.astype(np.float64) @ weight + bias


def test_options_are_the_recommended_ones(tmp_path):
    options = ort_session.session_options(threads=1, optimized_path=str(tmp_path / "optimized.onnx"))
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.optimized_model_filepath == str(tmp_path / "optimized.onnx")
    # Prepacking stays on: without it MatMulNBits dequantizes its weights to floats for every run.
    with pytest.raises(RuntimeError):  # onnxruntime raises for a key that was never set
        options.get_session_config_entry("session.disable_prepacking")
    plain = ort_session.session_options(threads=0, optimize=False)
    assert plain.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert plain.intra_op_num_threads == 0
    assert ort_session.describe()["config"] == {"session.qdq_matmulnbits_accuracy_level": "0"}


def test_fused_session_computes_the_file_from_path_and_bytes(tmp_path, blocked_model):
    serialized, codes, zeros, scales, bias = blocked_model
    path = tmp_path / "blocked.onnx"
    path.write_bytes(serialized)
    images = np.random.default_rng(1).normal(size=(5, K)).astype(np.float32)
    expected = _reference(images, codes, zeros, scales, bias)
    optimized = str(tmp_path / "optimized.onnx")
    results = {}
    for label, source, kwargs in (("path", str(path), {"optimized_path": optimized}), ("bytes", serialized, {}),
                                  ("unoptimized", serialized, {"optimize": False})):
        session = ort_session.create(source, threads=1, **kwargs)
        results[label] = session.run(None, {"input": images})[0]
        np.testing.assert_allclose(results[label], expected, rtol=1e-5, atol=1e-5, err_msg=label)
    # The weight ran as MatMulNBits (float activations at accuracy level 0), identically from path or bytes.
    fused = [node for node in onnx.load(optimized).graph.node if node.op_type == "MatMulNBits"]
    assert len(fused) == 1
    assert dict((a.name, a.i) for a in fused[0].attribute)["accuracy_level"] == 0
    np.testing.assert_array_equal(results["path"], results["bytes"])


def test_run_onnx_and_check_use_these_options(tmp_path, blocked_model):
    serialized, codes, zeros, scales, bias = blocked_model
    path = tmp_path / "blocked.onnx"
    path.write_bytes(serialized)
    images = np.random.default_rng(2).normal(size=(3, K)).astype(np.float32)
    expected = _reference(images, codes, zeros, scales, bias)
    np.testing.assert_allclose(onnx_export.run_onnx(str(path), images), expected, rtol=1e-5, atol=1e-5)
    result = onnx_check.check(serialized, images, ["codes"])
    assert result["ok"], result["reason"]
    assert result["fused"] == {"codes": {"op": "MatMulNBits", "bits": 4, "block_size": BLOCK, "K": K, "N": N}}
    np.testing.assert_allclose(result["logits"], expected, rtol=1e-5, atol=1e-5)
    assert os.path.exists(path)


def test_optimized_model_with_its_weights_beside_it_computes_the_source_bit_for_bit(tmp_path, blocked_model):
    """The deployment with the least memory: onnxruntime's optimized model, its initializers in a .data file it
    maps. Same outputs as the source file bit for bit, MatMulNBits already in the file, its packed codes outside."""
    serialized, codes, zeros, scales, bias = blocked_model
    source = tmp_path / "blocked.onnx"
    source.write_bytes(serialized)
    optimized = tmp_path / "deploy" / "model_ort.onnx"
    optimized.parent.mkdir()
    options = ort_session.session_options(threads=1, optimized_path=optimized, external_min_bytes=16)
    assert options.get_session_config_entry(
        "session.optimized_model_external_initializers_file_name") == "model_ort.onnx.data"
    images = np.random.default_rng(3).normal(size=(7, K)).astype(np.float32)
    expected = ort_session.create(str(source), threads=1, optimized_path=optimized, external_min_bytes=16).run(
        None, {"input": images})[0]
    data_file = ort_session.external_data_path(optimized)
    assert os.path.exists(data_file) and not os.path.exists(tmp_path / "model_ort.onnx.data")
    proto = onnx.load(str(optimized), load_external_data=False)
    fused = [node for node in proto.graph.node if node.op_type == "MatMulNBits"]
    assert len(fused) == 1
    external = {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer
                if t.data_location == TensorProto.EXTERNAL}
    packed_codes = fused[0].input[1]
    assert external[packed_codes]["location"] == "model_ort.onnx.data"
    assert int(external[packed_codes]["length"]) == K * N // 2  # 4-bit codes, two a byte
    deployed = ort_session.create(str(optimized), threads=1).run(None, {"input": images})[0]
    np.testing.assert_array_equal(deployed, expected)
    np.testing.assert_allclose(deployed, _reference(images, codes, zeros, scales, bias), rtol=1e-5, atol=1e-5)
