"""onnx_kbit on its own: every width, layout and grid stored as codes + DequantizeLinear, run by onnxruntime
against the packed format's NumPy dequantization (tfquant.export.packing), no TensorFlow involved."""
import numpy as np
import pytest

from tfquant.export import onnx_check, onnx_kbit
from tfquant.export.packed_file import QuantizedTensor

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

K, N = 40, 12  # K is no multiple of the block size: ragged last blocks / split pieces
LAYOUTS = {"none": dict(layout="none", channel_axes=None, bucket_size=None),
           "channel": dict(layout="channel", channel_axes=(1,), bucket_size=None),
           "split": dict(layout="split", channel_axes=None, bucket_size=16),
           "block": dict(layout="block", channel_axes=(1,), bucket_size=16)}


def _tensor(bits, layout, integer_zero_point, rng):
    from tfquant.export import packing
    groups = packing.num_groups((K, N), layout["layout"], layout["channel_axes"], layout["bucket_size"])
    codes = rng.integers(0, 2 ** bits, size=(K, N))
    alpha = rng.uniform(0.5, 2.0, groups).astype(np.float32)
    scale = np.multiply(alpha, np.float32(1.0 / (2 ** bits - 1)), dtype=np.float32)
    if integer_zero_point:  # beta = -zero point x scale, as the symmetric and LSQ grids store it
        beta = np.multiply(-np.float32(2 ** (bits - 1) - 1 if bits > 1 else 0), scale, dtype=np.float32)
    else:  # the min/max grid: beta is the group's minimum, no whole number of steps
        beta = rng.uniform(-1.0, -0.1, groups).astype(np.float32)
    return QuantizedTensor("w", (K, N), bits, layout["layout"], layout["channel_axes"], layout["bucket_size"],
                           codes, alpha, beta)


def _model(tensor, fusable):
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
                              [numpy_helper.from_array(tensor.dequantize(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    model.ir_version = 11
    overrides = {} if fusable else {"w": (None, False)}
    records = onnx_kbit.store_kbit_weights(model, {"w": tensor}, overrides)
    onnx.checker.check_model(model)
    return model, records["w"]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("integer_zero_point", [True, False])
@pytest.mark.parametrize("fusable", [True, False])
def test_codes_and_values_for_every_layout(bits, layout, integer_zero_point, fusable):
    rng = np.random.default_rng(bits * 7 + len(layout))
    tensor = _tensor(bits, LAYOUTS[layout], integer_zero_point, rng)
    model, record = _model(tensor, fusable)
    assert record["stored_type"] == ("UINT2" if bits <= 2 else "UINT4")
    if not fusable:  # the fallback form: the layout's own view and a Reshape, which onnxruntime fuses with nothing
        assert record["form"].startswith("reshaped/")
    np.testing.assert_array_equal(onnx_kbit.read_weight_codes(model)["w"], tensor.codes)
    x = rng.normal(size=(5, K)).astype(np.float32)
    reference = x.astype(np.float64) @ tensor.dequantize().astype(np.float64)
    for optimize in (False, True):
        y = onnx_check.run(onnx_check.session(model.SerializeToString(), optimize=optimize), x)
        assert np.max(np.abs(y - reference)) <= 1e-5 * np.max(np.abs(reference))


def test_direct_forms_where_the_groups_allow():
    rng = np.random.default_rng(0)
    forms = {name: _model(_tensor(4, layout, True, rng), True)[1]["form"] for name, layout in LAYOUTS.items()}
    # A [K, N] MatMul weight: per tensor, per output column, blocked along K (MatMulNBits' layout); split
    # pieces of 16 run across rows of 12, so they are dequantized in their own view and reshaped: one row per
    # piece, whose float offset (the trained values bit for bit) is one value per row.
    assert forms == {"none": "per_tensor", "channel": "per_axis", "split": "reshaped/per_axis", "block": "blocked"}


@pytest.mark.parametrize("layout", ["none", "channel", "split"])
def test_dequantized_weights_are_the_trained_values_bit_for_bit(layout):
    """Where onnxruntime's MatMulNBits does not take a weight, the file's DequantizeLinear (+ offset) gives the packed
    format's values, the trained graph's, bit for bit: a symmetric grid's (code - zero point) * scale is an ulp off
    code * scale + beta for about half its codes, so the weight gets zero point 0 and beta added instead. An
    identity matrix times the weight reads the values back exactly."""
    tensor = _tensor(4, LAYOUTS[layout], True, np.random.default_rng(11))
    scale, zero = onnx_kbit.group_scales(tensor)
    assert zero is not None and not onnx_kbit.dequantizes_as_trained(tensor, scale, zero)
    model, record = _model(tensor, True)
    assert record["dequantizes_as_trained"] and record["zero_point"].startswith("float_offset")
    identity = np.eye(K, dtype=np.float32)
    for optimize in (False, True):
        values = onnx_check.run(onnx_check.session(model.SerializeToString(), optimize=optimize), identity)
        np.testing.assert_array_equal(values, tensor.dequantize(), err_msg="optimize=%s" % optimize)


def test_matmul_nbits_weight_keeps_its_integer_zero_point():
    """A [K, N] weight blocked along K keeps the integer zero point MatMulNBits needs (that kernel dequantizes in its
    own arithmetic); the record says its DequantizeLinear is not the trained values bit for bit."""
    tensor = _tensor(4, LAYOUTS["block"], True, np.random.default_rng(11))
    _, record = _model(tensor, True)
    assert record["form"] == "blocked" and record["zero_point"] == "integer"
    assert not record["dequantizes_as_trained"]
