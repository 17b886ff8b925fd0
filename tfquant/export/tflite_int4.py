"""LiteRT INT4: the int8 TFLite file with its FULLY_CONNECTED and CONV_2D weights rewritten as INT4 tensors.

The TF converter writes no int4 tensor, but on the symmetric grid (weight_scheme='symmetric', zero point 0)
a weight of k <= 4 bits reaches the int8 file exactly: its int8 values are the trained signed codes
(code - (2^(k-1)-1), in -7..7) with the trained per-channel scales. This module checks that, value for value,
against the packed file's codes, and rewrites those weight tensors with the flatbuffer schema's own Python
module (ai_edge_litert.schema_py_generated) as INT4: two codes a byte, the first in the low nibble, the
quantization parameters unchanged. LiteRT runs INT4 weights in FULLY_CONNECTED and CONV_2D; every other
operator (depthwise convolutions, ...) keeps its int8 weight, and each weight's outcome is recorded.
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


def pack_int4(values):
    """Signed values in -8..7 packed two a byte, the first in the low nibble (TFLite's INT4 layout)."""
    values = np.asarray(values, np.int64).reshape(-1)
    return packing.pack_codes(values & 0xF, 4)


def to_int4(int8_model, tensors, report, storage="INT4"):
    """The int8 model with its FULLY_CONNECTED / CONV_2D k-bit weights as INT4 tensors of the trained codes.

    With storage='INT8' the same weights are written as INT8 tensors of the trained codes instead: TensorFlow's
    converter itself writes a <= 4-bit FakeQuant weight as INT4, moving a 2-3-bit grid onto a 4-bit one, so
    this gives the int8 file int8 weights on exactly the trained grid.

    The weight's scales become the trained steps, and its int32 bias is rescaled to the new product of steps
    (round(bias * old / new), which gives back the trained bias codes exactly when the converter had moved
    a 2-3-bit grid onto 4 bits).

    Args:
      int8_model: the int8 .tflite bytes (tflite_export.convert_int8_trained).
      tensors: the packed file's tensors (read_packed_model).
      report: the QuantReport (eligible(report) must be '').
      storage: 'INT4' or 'INT8'.
    Returns:
      (the rewritten .tflite bytes, [per weight tensor: {tensor, operator, layer, stored: 'INT4' | 'INT8', reason}]).
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
            if storage == "INT4":
                buffer.data = np.frombuffer(pack_int4(stored), np.uint8)
            else:
                buffer.data = np.frombuffer(stored.astype(np.int8).tobytes(), np.uint8)
            tensor.type = getattr(schema.TensorType, storage)
            ratio = old_scales / step.astype(np.float64).reshape(old_scales.shape)
            tensor.quantization.scale = [float(v) for v in step.reshape(-1)]
            if len(operator.inputs) > 2 and operator.inputs[2] >= 0 and not np.array_equal(ratio, np.ones_like(ratio)):
                _rescale_bias(model, subgraph.tensors[operator.inputs[2]], ratio, schema)
            done.add(tensor.buffer)
            record["stored"] = storage
            record["converter_requantized"] = bool(not np.array_equal(stored, values))
    builder = flatbuffers.Builder(len(int8_model))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), records


def _rescale_bias(model, bias, ratio, schema):
    """An int32 bias on the scale (input step x weight step / ratio): values round(bias * ratio)."""
    if bias.type != schema.TensorType.INT32:
        return
    buffer = model.buffers[bias.buffer]
    values = np.frombuffer(bytes(bytearray(buffer.data)), np.int32).astype(np.float64)
    buffer.data = np.frombuffer(np.round(values * ratio).astype(np.int32).tobytes(), np.uint8)
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
