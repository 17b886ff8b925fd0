"""ONNX export with QuantizeLinear/DequantizeLinear pairs, through tf2onnx, run by onnxruntime.

The source is the FakeQuant inference graph (tfquant.export.fake_quant_graph): tf2onnx turns each
fake_quant_with_min_max_vars(_per_channel) into a QuantizeLinear/DequantizeLinear pair with its scale
and zero point, so the ONNX model carries tfquant's trained weight and activation ranges. tf2onnx and
onnxruntime are optional dependencies (`pip install tfquant[onnx]`).
"""
import numpy as np

from tfquant.export import model_export

OPSET = 17


class OnnxUnavailableError(ImportError):
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


def convert(graph_def):
    """An ONNX model (bytes) of a frozen inference graph with input 'input' and output 'logits'.

    Args:
      graph_def: a frozen GraphDef (FakeQuant ops become QuantizeLinear/DequantizeLinear).
    Returns:
      the serialized ONNX ModelProto.
    """
    tf2onnx = _require("tf2onnx")
    model, _ = tf2onnx.convert.from_graph_def(
        graph_def, input_names=[model_export.INPUT_NAME + ":0"], output_names=[model_export.OUTPUT_NAME + ":0"],
        opset=OPSET)
    return model.SerializeToString()


def quantize_linear_pairs(model):
    """(number of QuantizeLinear, number of DequantizeLinear) nodes of a serialized ONNX model."""
    onnx = _require("onnx")
    proto = onnx.load_from_string(model)
    types = [node.op_type for node in proto.graph.node]
    return types.count("QuantizeLinear"), types.count("DequantizeLinear")


def _session(model, num_threads):
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(model, images, batch_size=256, num_threads=2):
    """Float logits of an ONNX model on images.

    Args:
      model: serialized ONNX model (bytes).
      images: float32 [N, H, W, C].
      batch_size: images per run.
      num_threads: intra-op threads.
    Returns:
      float32 logits [N, classes].
    """
    session = _session(model, num_threads)
    name = session.get_inputs()[0].name
    images = np.asarray(images, np.float32)
    return np.concatenate([session.run(None, {name: images[start:start + batch_size]})[0]
                           for start in range(0, len(images), batch_size)])


def single_image_runner(model, num_threads=1):
    """A function running one [1, H, W, C] image through the ONNX model (for latency measurement)."""
    session = _session(model, num_threads)
    name = session.get_inputs()[0].name

    def run(image):
        return session.run(None, {name: image[None].astype(np.float32)})[0]
    return run
