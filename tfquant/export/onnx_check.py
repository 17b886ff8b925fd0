"""Running an ONNX model as it is deployed (onnxruntime, every graph optimization) and checking it against
the same file run without optimizations: what onnxruntime fused, and whether the fused kernels compute what
the file says.

onnxruntime fuses DequantizeLinear -> MatMul with a blocked k-bit weight into its MatMulNBits kernel and Q/DQ
convolutions into integer kernels. `session.qdq_matmulnbits_accuracy_level=0` keeps MatMulNBits' activations
float (its default level quantizes them to 8 bits and changes the results). Two of its defects are known:
2-bit MatMulNBits computes wrong results when N is not a multiple of 4, and a 2-bit Q/DQ convolution fails to
load at full optimization. Neither is assumed: `check` finds them by comparing the two runs (or catching the
failure), and the exporter falls back for the layers concerned (onnx_kbit_export).
"""
import os
import tempfile

import numpy as np

from tfquant.export import ort_session

# A fused kernel whose logits differ from the unoptimized run by more than this share of the logits' scale
# computes something else (the known defects give differences of the order of the logits themselves; an
# int8 Q/DQ activation requantized by an integer kernel moves a logit by at most a few steps of its range).
MAX_RELATIVE_DIFFERENCE = 0.05


def session(model, optimize=True, threads=2, optimized_path=None):
    """An onnxruntime CPU session of a model, with tfquant's session options (ort_session).

    Args:
      model: serialized ONNX model (bytes) or an .onnx file's path.
      optimize: ENABLE_ALL graph optimizations (MatMulNBits at accuracy level 0) or none at all.
      threads: intra-op threads (0: onnxruntime's default, every core).
      optimized_path: where onnxruntime writes the model it optimized (None: not written).
    """
    return ort_session.create(model, threads=threads, optimize=optimize, optimized_path=optimized_path)


def run(model_session, images, batch_size=256):
    """Float logits of a session on float32 images [N, ...]."""
    name = model_session.get_inputs()[0].name
    images = np.asarray(images, np.float32)
    return np.concatenate([model_session.run(None, {name: images[start:start + batch_size]})[0]
                           for start in range(0, len(images), batch_size)])


def fused_kernels(optimized, codes_names):
    """{codes initializer name: description} of the k-bit weights onnxruntime fused into MatMulNBits.

    Args:
      optimized: the ModelProto onnxruntime wrote (optimized_model_filepath).
      codes_names: the codes initializers of the k-bit weights.
    Returns:
      {codes name: {'op': 'MatMulNBits', 'bits', 'block_size', 'K', 'N'}} of the fused ones.
    """
    import onnx  # pylint: disable=import-outside-toplevel
    fused = {}
    for node in optimized.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 2:
            continue
        for name in codes_names:
            # onnxruntime names the weight it transposes for the kernel after the codes initializer.
            if node.input[1] == name or node.input[1].startswith(name + "_"):
                attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                fused[name] = {"op": "MatMulNBits", "bits": int(attributes.get("bits", 0)),
                               "block_size": int(attributes.get("block_size", 0)),
                               "K": int(attributes.get("K", 0)), "N": int(attributes.get("N", 0))}
    return fused


def check(model, images, codes_names=()):
    """Run a model optimized and unoptimized on `images` and compare.

    Args:
      model: serialized ONNX model.
      images: float32 inputs.
      codes_names: codes initializers whose fusion into MatMulNBits is looked up.
    Returns:
      dict: ok, reason ('' when ok), relative_difference, top1_agreement (optimized vs unoptimized), logits
      (the optimized run's, None on failure), fused ({codes name: kernel}).
    """
    import onnx  # pylint: disable=import-outside-toplevel
    result = {"ok": False, "reason": "", "relative_difference": None, "top1_agreement": None, "logits": None,
              "fused": {}}
    try:
        plain = run(session(model, optimize=False), images)
    except Exception as exc:  # pylint: disable=broad-except  (onnxruntime raises its own exception types)
        result["reason"] = "onnxruntime cannot run the file unoptimized: %s" % _first_line(exc)
        return result
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "optimized.onnx")
        try:
            optimized = run(session(model, optimize=True, optimized_path=path), images)
        except Exception as exc:  # pylint: disable=broad-except
            result["reason"] = "onnxruntime fails with all optimizations: %s" % _first_line(exc)
            return result
        result["fused"] = fused_kernels(onnx.load(path), codes_names) if os.path.exists(path) else {}
    scale = max(float(np.max(np.abs(plain))), 1e-12)
    difference = float(np.max(np.abs(optimized - plain))) / scale
    result.update(relative_difference=difference, logits=optimized,
                  top1_agreement=float(np.mean(optimized.argmax(-1) == plain.argmax(-1))))
    if not np.all(np.isfinite(optimized)) or difference > MAX_RELATIVE_DIFFERENCE:
        result["reason"] = ("onnxruntime's optimized kernels disagree with the file run unoptimized (logits differ "
                            "by %.3g of their scale)" % difference)
        return result
    result["ok"] = True
    return result


def _first_line(exc):
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
