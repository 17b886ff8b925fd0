"""LiteRT INT4: the int8 TFLite file with its FULLY_CONNECTED and CONV_2D weights rewritten as INT4 tensors.

The TF converter writes no int4 tensor, but on the symmetric grid (weight_scheme='symmetric', zero point 0)
a weight of k <= 4 bits reaches the int8 file exactly: its int8 values are the trained signed codes
(code - (2^(k-1)-1), in -7..7) with the trained per-channel scales. This module checks that, value for value,
against the packed file's codes, and rewrites those weight tensors with the flatbuffer schema's own Python
module (ai_edge_litert.schema_py_generated) as INT4: two codes a byte, the first in the low nibble. LiteRT runs
INT4 weights in FULLY_CONNECTED and CONV_2D; every other operator (depthwise convolutions, ...) keeps its int8
weight, and each weight's outcome is recorded.

Each output channel's codes are stored times the largest integer m that keeps them in the storage type (7 for a
2-bit grid's -1..1 in INT4, 127 // max|code| in INT8) on a step divided by m: the same weights, for LiteRT's built-in
kernels a smaller requantization error (code_multipliers). XNNPACK, LiteRT's default CPU delegate, runs none of the
INT4 convolutions, so the built-in kernels decide how closely model_int4.tflite follows the trained graph; under a
fused ReLU its int32 bias is one accumulator unit lower, which cancels most of their rounding error
(requantization_error) and would be an error of M / m output steps on a kernel that rounded once (the records say
how many channels: bias_lowered_channels). Convolutions without a fused ReLU keep part of that error: one step on
about 1 % of a 4-bit ResNet-20 layer's codes, which the int8 file under XNNPACK does not have.
"""
import itertools

import numpy as np

from tfquant import weight_grids
from tfquant.config import FLOAT_BITS
from tfquant.export import packing

INT4_OPERATORS = ("FULLY_CONNECTED", "CONV_2D")
MAX_INT4_BITS = 4


def _schema():
    from ai_edge_litert import schema_py_generated  # pylint: disable=import-outside-toplevel
    return schema_py_generated


def eligible(report):
    """'' when the model's quantized weights are all <= 4 bits on the symmetric grid, else why not."""
    for layer in report.weight_layers:
        grid = weight_grids.for_layer(layer, report.config)
        if layer.quantized and layer.bits != FLOAT_BITS and not isinstance(grid, weight_grids.SymmetricGrid):
            return "weights are not on the symmetric grid (layer %s: the %s grid)" % (layer.name, grid.name)
    widest = max((layer.bits for layer in report.weight_layers if layer.quantized and layer.bits != FLOAT_BITS),
                 default=None)
    if widest is None or widest > MAX_INT4_BITS:
        return "weights of %s bits; expected at most %d" % (widest, MAX_INT4_BITS)
    return ""


def _trained_weights(tensors, report):
    """{layer name: (signed codes, step per range group, weight variable)} of the report's <= 4-bit weights."""
    packed = {t.name: t for t in tensors if hasattr(t, "codes")}
    found = {}
    for layer in report.weight_layers:
        tensor = packed.get(layer.weight_variable)
        if tensor is None or not layer.quantized or layer.bits == FLOAT_BITS or layer.bits > MAX_INT4_BITS:
            continue
        step = np.multiply(tensor.alpha, np.float32(1.0 / ((1 << tensor.bits) - 1)), dtype=np.float32)
        found[layer.name] = (tensor.codes.astype(np.int64) - (2 ** (tensor.bits - 1) - 1), step,
                             layer.weight_variable)
    return found


def _layer_of(tensor_name, trained):
    """The trained layer whose weight FakeQuant the converter named this tensor after, or None."""
    owners = [name for name in trained if name + "/weight_fake_quant" in tensor_name]
    return max(owners, key=len) if owners else None


def _as_stored(codes, step, values, scales):
    """The trained signed codes in the file tensor's layout, when some transpose of them dequantizes to the
    converter's values within half its step (the converter may requantize a 2-3-bit grid onto 4 bits)."""
    scales = np.asarray(scales, np.float64)
    steps = np.asarray(step, np.float64)
    if steps.size != scales.size:
        return None
    view = [-1] + [1] * (values.ndim - 1) if scales.size > 1 else [1] * values.ndim
    stored = values * scales.reshape(view)
    for order in itertools.permutations(range(codes.ndim)):
        candidate = codes.transpose(order).reshape(values.shape)
        trained = candidate * steps.reshape(view)
        if np.all(np.abs(trained - stored) <= 0.5001 * scales.reshape(view)):
            return candidate
    return None


# The largest code magnitude each storage type holds (symmetric: -7..7 and -127..127).
STORAGE_MAX = {"INT4": 7, "INT8": 127}


def requantization_error(multiplier, bias_offset):
    """The share of outputs LiteRT's built-in kernels round the wrong way, for requantization multipliers M
    (input step x weight step / output step) and an int32 bias lowered by bias_offset accumulator units.

    Those kernels requantize in two roundings, half away from zero: acc * M * 2^r to an integer (r such that
    M * 2^r is in [0.5, 1)), then a rounding shift right by r. For acc * M >= 0 that is exactly
    floor(acc * M + 0.5 + 2^-(r+1)): 2^-(r+1) of an output step too high, so a share 2^-(r+1) of the outputs is one
    step off (none when M >= 0.5: no shift). One accumulator unit less of bias makes that error M - 2^-(r+1).
    """
    multiplier = np.asarray(multiplier, np.float64)
    shifted = np.where(multiplier < 0.5, 2.0 ** np.floor(np.log2(np.maximum(multiplier, 1e-300))), 0.0)
    return np.abs(shifted - bias_offset * np.where(multiplier < 0.5, multiplier, 0.0))


def code_multipliers(stored, step, largest, requantization=None, bias_offset=0):
    """Per range group, the integer m in 1 .. largest // max|code| to store its codes times (on a step / m).

    Codes times m on a step divided by m are the same weights with the requantization multiplier M / m: where
    M >= 0.5 LiteRT's built-in kernels round exactly (m = 1); elsewhere the m of the smallest
    requantization_error(M / m, bias_offset), the largest on ties. Without `requantization` (M per group), the
    largest m.
    """
    groups = np.asarray(step).size
    top = np.abs(np.asarray(stored, np.int64)).reshape(groups if groups > 1 else 1, -1).max(axis=1)
    most = np.maximum(largest // np.maximum(top, 1), 1).astype(np.int64)
    if requantization is None:
        return most
    requantization = np.broadcast_to(np.asarray(requantization, np.float64).reshape(-1), most.shape)
    found = np.ones_like(most)
    for index, (limit, value) in enumerate(zip(most, requantization)):
        candidates = np.arange(1, limit + 1)
        errors = requantization_error(value / candidates, bias_offset)
        found[index] = candidates[np.flatnonzero(errors <= errors.min())[-1]]
    return found


def pack_int4(values):
    """Signed values in -8..7 packed two a byte, the first in the low nibble (TFLite's INT4 layout)."""
    values = np.asarray(values, np.int64).reshape(-1)
    return packing.pack_codes(values & 0xF, 4)


def to_int4(int8_model, tensors, report, storage="INT4"):
    """The int8 model with its FULLY_CONNECTED / CONV_2D k-bit weights as INT4 tensors of the trained codes.

    With storage='INT8' the same weights are written as INT8 tensors of the trained codes instead: TensorFlow's
    converter itself writes a <= 4-bit FakeQuant weight as INT4, moving a 2-3-bit grid onto a 4-bit one, so
    this gives the int8 file int8 weights on exactly the trained grid.

    Each output channel's codes are stored times its code multiplier m (code_multipliers) and its scale is the
    trained step / m; the int32 bias is rescaled to the new product of steps (round(bias * old / new), which gives
    back the trained bias codes times m exactly).

    Args:
      int8_model: the int8 .tflite bytes (tflite_export.convert_int8_trained).
      tensors: the packed file's tensors (read_packed_model).
      report: the QuantReport (eligible(report) must be '').
      storage: 'INT4' or 'INT8'.
    Returns:
      (the rewritten .tflite bytes, [per weight tensor: {tensor, operator, layer, stored: 'INT4' | 'INT8', reason,
      and for a rewritten one converter_requantized and code_multiplier: the distinct multipliers}]).
    """
    import flatbuffers  # pylint: disable=import-outside-toplevel
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(int8_model), 0)
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    trained = _trained_weights(tensors, report)
    records, done = [], set()
    for subgraph in model.subgraphs:
        for operator in subgraph.operators:
            code = model.operatorCodes[operator.opcodeIndex]
            kind = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), str(code.builtinCode))
            if len(operator.inputs) < 2 or operator.inputs[1] < 0:
                continue
            tensor = subgraph.tensors[operator.inputs[1]]
            buffer = model.buffers[tensor.buffer]
            if tensor.type not in (schema.TensorType.INT8, schema.TensorType.INT4) or buffer.data is None \
                    or len(buffer.data) == 0:
                continue
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
            layer = _layer_of(name, trained)
            record = {"tensor": name, "operator": kind, "layer": layer,
                      "stored": "INT4" if tensor.type == schema.TensorType.INT4 else "INT8", "reason": ""}
            records.append(record)
            if layer is None:
                record["reason"] = "not a <= 4-bit trained weight"
                continue
            if kind not in INT4_OPERATORS:
                record["reason"] = "%s takes int8 weights only" % kind
                continue
            if tensor.buffer in done:
                record["stored"] = storage
                continue
            data = bytes(bytearray(buffer.data))
            values = (_unpack_int4(data, tensor.shape) if tensor.type == schema.TensorType.INT4
                      else np.frombuffer(data, np.int8).reshape(tensor.shape).astype(np.int64))
            codes, step, _ = trained[layer]
            old_scales = np.asarray(tensor.quantization.scale, np.float64)
            stored = _as_stored(codes, step, values, old_scales)
            if stored is None:
                record["reason"] = "the converter's weight is not on the trained grid"
                continue
            requantization = _requantization(subgraph, operator, step)
            # A fused ReLU keeps only acc * M >= 0, where one accumulator unit less of bias cancels most of the
            # built-in kernels' rounding error (requantization_error); INT4 layers run on those kernels only.
            offset = int(storage == "INT4" and requantization is not None and _fused_relu(operator, schema))
            multiplier = code_multipliers(stored, step, STORAGE_MAX[storage], requantization, offset)
            offset = offset * (requantization is not None and np.any(requantization / multiplier < 0.5))
            view = [-1] + [1] * (stored.ndim - 1) if multiplier.size > 1 else [1] * stored.ndim
            scaled = stored * multiplier.reshape(view)
            if storage == "INT4":
                buffer.data = np.frombuffer(pack_int4(scaled), np.uint8)
            else:
                buffer.data = np.frombuffer(scaled.astype(np.int8).tobytes(), np.uint8)
            tensor.type = getattr(schema.TensorType, storage)
            new_scales = (step.astype(np.float32).reshape(-1) / multiplier.astype(np.float32)).astype(np.float32)
            ratio = old_scales / new_scales.astype(np.float64).reshape(old_scales.shape)
            tensor.quantization.scale = [float(v) for v in new_scales]
            if len(operator.inputs) > 2 and operator.inputs[2] >= 0 and (
                    offset or not np.array_equal(ratio, np.ones_like(ratio))):
                lowered = offset * (requantization / multiplier < 0.5) if offset else 0
                _rescale_bias(model, subgraph.tensors[operator.inputs[2]], ratio, schema, lowered)
                record["bias_lowered_channels"] = int(np.sum(lowered))
            done.add(tensor.buffer)
            record["stored"] = storage
            record["converter_requantized"] = bool(not np.array_equal(stored, values))
            record["code_multiplier"] = sorted({int(m) for m in multiplier.reshape(-1)})
    builder = flatbuffers.Builder(len(int8_model))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), records


def _requantization(subgraph, operator, step):
    """Input step x weight step / output step per output channel, in float64 as LiteRT computes it, or None."""
    if operator.inputs[0] < 0 or not operator.outputs:
        return None
    scales = [subgraph.tensors[index].quantization for index in (operator.inputs[0], operator.outputs[0])]
    if any(q is None or q.scale is None or len(q.scale) != 1 for q in scales):
        return None
    return (np.float64(scales[0].scale[0]) * np.asarray(step, np.float32).reshape(-1).astype(np.float64)
            / np.float64(scales[1].scale[0]))


def _fused_relu(operator, schema):
    """Whether the operator's own activation is ReLU or ReLU6 (its output keeps acc * M >= 0 only)."""
    options = operator.builtinOptions
    return getattr(options, "fusedActivationFunction", None) in (schema.ActivationFunctionType.RELU,
                                                                  schema.ActivationFunctionType.RELU6)


def _rescale_bias(model, bias, ratio, schema, lowered=0):
    """An int32 bias on the scale (input step x weight step / ratio): values round(bias * ratio) - lowered."""
    if bias.type != schema.TensorType.INT32:
        return
    buffer = model.buffers[bias.buffer]
    values = np.frombuffer(bytes(bytearray(buffer.data)), np.int32).astype(np.float64)
    values = np.round(values * np.asarray(ratio, np.float64).reshape(-1)) - lowered
    buffer.data = np.frombuffer(values.astype(np.int32).tobytes(), np.uint8)
    bias.quantization.scale = [float(v) for v in np.asarray(bias.quantization.scale, np.float64) / ratio]


def _unpack_int4(data, shape):
    """Signed values of packed INT4 data (two a byte, the first in the low nibble)."""
    nibbles = packing.unpack_codes(np.frombuffer(data, np.uint8), 4, int(np.prod(shape))).astype(np.int64)
    return np.where(nibbles > 7, nibbles - 16, nibbles).reshape(shape)


def int4_weight_codes(model_bytes):
    """{tensor name: signed int4 values} of the INT4 tensors of a .tflite model, unpacked with NumPy."""
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    found = {}
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            if tensor.type != schema.TensorType.INT4:
                continue
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
            found[name] = _unpack_int4(bytes(bytearray(model.buffers[tensor.buffer].data)), tensor.shape)
    return found
