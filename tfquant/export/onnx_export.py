"""ONNX export with QuantizeLinear/DequantizeLinear pairs, through tf2onnx, run by onnxruntime.

The source is the FakeQuant inference graph (tfquant.export.fake_quant_graph): tf2onnx turns each
fake_quant_with_min_max_vars(_per_channel) into a QuantizeLinear/DequantizeLinear pair with its scale
and zero point, so the ONNX model carries tfquant's trained weight and activation ranges. tf2onnx and
onnxruntime are optional dependencies (`pip install tfquant[onnx]`).
"""
import os

import numpy as np
import tensorflow as tf

from tfquant.errors import TfquantError
from tfquant.export import inference_graph, model_files, ort_session

OPSET = 17


class OnnxUnavailableError(TfquantError, ImportError):
    """tf2onnx or onnxruntime is not installed."""


def available():
    """Whether the optional packages ONNX export needs (onnx, tf2onnx, onnxruntime) are installed."""
    import importlib.util
    return all(importlib.util.find_spec(name) for name in ("onnx", "tf2onnx", "onnxruntime"))


def _require(name):
    try:
        return __import__(name)
    except ImportError as exc:
        raise OnnxUnavailableError("ONNX export needs %s (pip install 'tfquant[onnx]'): %s" % (name, exc)) from None


def with_converter_ops(graph_def):
    """A copy of the graph with each op tf2onnx has no handler for replaced by ops it has: Erfc(x) (TensorFlow's
    exact GELU, tf.nn.gelu(approximate=False), is 0.5 * x * erfc(-x / sqrt 2)) becomes 1 - Erf(x), under the
    Erfc's name. Without this tf2onnx leaves an unknown 'Erfc' op that ONNX's version converter rejects.

    Args:
      graph_def: a frozen GraphDef.
    Returns:
      the GraphDef to convert (the same object when nothing needed replacing).
    """
    if not any(node.op == "Erfc" for node in graph_def.node):
        return graph_def
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    converted = tf.compat.v1.GraphDef()
    converted.CopyFrom(graph_def)
    for node in converted.node:
        if node.op != "Erfc":
            continue
        dtype = node.attr["T"].type
        one, erf = converted.node.add(), converted.node.add()
        one.name, one.op = node.name + "/one", "Const"
        one.attr["dtype"].type = dtype
        one.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(1.0, tf.as_dtype(dtype)))
        erf.name, erf.op = node.name + "/erf", "Erf"
        erf.input.extend(node.input)
        erf.attr["T"].type = dtype
        node.op = "Sub"
        del node.input[:]
        node.input.extend([one.name, erf.name])
    return converted


def convert(graph_def):
    """An ONNX model (bytes) of a frozen inference graph with input 'input' and output 'logits'.

    Args:
      graph_def: a frozen GraphDef (FakeQuant ops become QuantizeLinear/DequantizeLinear).
    Returns:
      the serialized ONNX ModelProto.
    """
    tf2onnx = _require("tf2onnx")
    model, _ = tf2onnx.convert.from_graph_def(
        with_converter_ops(graph_def), input_names=[inference_graph.INPUT_NAME + ":0"],
        output_names=[inference_graph.OUTPUT_NAME + ":0"], opset=OPSET)
    store_weight_codes(model, graph_def)
    return model.SerializeToString()


# ONNX Conv weights are OIHW: the output channel, which per-channel weight ranges follow, is axis 0.
_WEIGHT_AXIS = {"Conv": 0, "MatMul": -1}
_CODE_OFFSET = 128  # uint8 code = signed narrow-range code + 128


def _weight_grids(graph_def):
    """{FakeQuant node name: (step per range, bits, the name)} of the graph's narrow-range (weight) FakeQuant ops."""
    constants = {node.name: node for node in graph_def.node if node.op == "Const"}
    grids = {}
    for node in graph_def.node:
        if node.op not in ("FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel"):
            continue
        range_nodes = [constants.get(name.split(":")[0]) for name in node.input[1:3]]
        if not node.attr["narrow_range"].b or None in range_nodes:
            continue
        low, high = (tf.make_ndarray(n.attr["value"].tensor).astype(np.float32) for n in range_nodes)
        bits = node.attr["num_bits"].i
        grids[node.name] = ((high - low) / np.float32(2 ** bits - 2), bits, node.name)
    return grids


def _codes_on_grid(value, axis, step, bits, fake_quant):
    """(signed codes, step, fake_quant) of a weight on a FakeQuant's grid (per channel along `axis`), or None when
    a value is off it or a code out of its range."""
    shape = [1] * value.ndim
    if np.ndim(step):
        if value.shape[axis] != np.size(step):
            return None
        shape[axis] = -1
    scaled = value / step.reshape(shape)
    codes = np.round(scaled)
    if np.abs(scaled - codes).max() > 1e-2 or np.abs(codes).max() > 2 ** (bits - 1) - 1:
        return None
    return codes, step, fake_quant


def store_weight_codes(model, graph_def):
    """Store each Conv / MatMul weight that a weight FakeQuant put on its grid as uint8 codes + DequantizeLinear.

    tf2onnx folds the weight FakeQuant ops into float initializers. Left float, onnxruntime quantizes them
    again with its own per-tensor range (its weight-bias quantization pass), which is not the trained grid;
    stored as int8, its u8 x s8 kernels on x86 without VNNI sum pairs of products in 16 bits and saturate.
    uint8 codes with zero point 128 keep the trained per-channel grid exactly and avoid both. A weight not
    exactly on its FakeQuant's grid stays float.

    Args:
      model: the onnx ModelProto tf2onnx returned (changed in place).
      graph_def: the FakeQuant GraphDef it was converted from.
    Returns:
      the number of weights stored as codes.
    """
    onnx = _require("onnx")
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    grids = _weight_grids(graph_def)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    # Grids a weight is named after are not offered to another weight.
    used = {fake_quant for fake_quant in grids for name in initializers
            if name == fake_quant or name.startswith((fake_quant + "__", fake_quant + ":"))}
    dequantize = []
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_AXIS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        name = node.input[1]
        # tf2onnx names a folded constant after the op that produced it (plus a suffix).
        owners = [fake_quant for fake_quant in grids if name == fake_quant
                  or name.startswith((fake_quant + "__", fake_quant + ":"))]
        value = numpy_helper.to_array(initializers[name])
        axis = _WEIGHT_AXIS[node.op_type] % value.ndim
        if owners:
            found = _codes_on_grid(value, axis, *grids[max(owners, key=len)])
        else:
            # A kernel folded through more ops (a depthwise kernel's per-channel view reshaped back, then
            # transposed to a grouped Conv's) gets a generic name: it is the one weight grid not yet taken
            # whose step per output channel puts every value on a code.
            found = next((f for f in (_codes_on_grid(value, axis, *grids[fake_quant]) for fake_quant in grids
                                      if fake_quant not in used and np.ndim(grids[fake_quant][0]))
                          if f is not None), None)
        if found is None:
            continue
        codes, step, fake_quant = found
        used.add(fake_quant)
        model.graph.initializer.remove(initializers[name])
        model.graph.initializer.extend([
            numpy_helper.from_array((codes + _CODE_OFFSET).astype(np.uint8), name + "_codes"),
            numpy_helper.from_array(np.asarray(step, np.float32), name + "_scale"),
            numpy_helper.from_array(np.full(np.shape(step), _CODE_OFFSET, np.uint8), name + "_zero_point")])
        attributes = {"axis": axis} if np.ndim(step) else {}
        dequantize.append(onnx.helper.make_node(
            "DequantizeLinear", [name + "_codes", name + "_scale", name + "_zero_point"], [name],
            name=name + "_dequantize", **attributes))
    for node in reversed(dequantize):
        model.graph.node.insert(0, node)
    return len(dequantize)


def quantize_linear_pairs(model):
    """(QuantizeLinear nodes, DequantizeLinear nodes of computed tensors) of a serialized ONNX model: the
    activation pairs; weights stored as codes (store_weight_codes) have a DequantizeLinear only."""
    onnx = _require("onnx")
    proto = onnx.load_from_string(model)
    stored = {tensor.name for tensor in proto.graph.initializer}
    types = [node.op_type for node in proto.graph.node]
    return types.count("QuantizeLinear"), sum(node.op_type == "DequantizeLinear" and node.input[0] not in stored
                                              for node in proto.graph.node)


def weight_codes(model):
    """{weight name: (signed integer codes, scale, axis or None)} of the weights a serialized model stores
    as codes."""
    onnx = _require("onnx")
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    proto = onnx.load_from_string(model)
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in proto.graph.initializer}
    found = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            stored = initializers[node.input[0]].astype(np.int32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            shape = [1] * stored.ndim
            if axis is not None:
                shape[axis] = -1
            codes = stored - np.reshape(initializers[node.input[2]].astype(np.int32), shape)
            found[node.output[0]] = (codes, initializers[node.input[1]], axis)
    return found


def _session(model, num_threads):
    """An onnxruntime session (ort_session's options) of serialized bytes, or of a file checked by model_files
    and then loaded from its path (bytes handed to onnxruntime stay alive beside its own copy)."""
    _require("onnxruntime")
    where = None
    if not isinstance(model, (bytes, bytearray)):
        where = "ONNX model %s" % os.fspath(model)
        model_files.read_model_file(model, "onnx")
        model = os.fspath(model)
    try:
        return ort_session.create(model, threads=num_threads)
    except Exception as exc:  # pylint: disable=broad-except  (onnxruntime raises its own exception types)
        if where is None:
            raise
        raise model_files.ModelFileError("%s cannot be loaded by onnxruntime (%s); expected an .onnx model as "
                                         "exported" % (where, model_files.one_line(exc))) from None


def run_onnx(model, images, batch_size=256, num_threads=2):
    """Float logits of an ONNX model on images.

    Args:
      model: serialized ONNX model (bytes), or an .onnx file's path.
      images: float32 [N, H, W, C].
      batch_size: images per run.
      num_threads: intra-op threads.
    Returns:
      float32 logits [N, classes].
    """
    session = _session(model, num_threads)
    name = session.get_inputs()[0].name
    images = np.asarray(images, np.float32)
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        try:
            outputs.append(session.run(None, {name: chunk})[0])
        except Exception as exc:  # pylint: disable=broad-except  (onnxruntime raises its own exception types)
            # A model whose input does not take these images (a damaged file, another model's file).
            where = "ONNX model" if isinstance(model, (bytes, bytearray)) else "ONNX model %s" % os.fspath(model)
            raise model_files.ModelFileError(
                "%s cannot run a batch of images of shape %s (onnxruntime: %s); expected a model whose input %r "
                "takes them" % (where, list(chunk.shape), model_files.one_line(exc), name)) from None
    return np.concatenate(outputs)


def single_image_runner(model, num_threads=1):
    """A function running one [1, H, W, C] image through the ONNX model (for latency measurement)."""
    session = _session(model, num_threads)
    name = session.get_inputs()[0].name

    def run(image):
        return session.run(None, {name: image[None].astype(np.float32)})[0]
    return run
