"""The k-bit ONNX file: weights of at most 4 bits as their trained codes (onnx_kbit), 5-8-bit weights as uint8
codes and activations as int8 Q/DQ pairs (onnx_export), checked by running it in onnxruntime (onnx_check).

The file is built from the FakeQuant inference graph (fake_quant_graph) with each k-bit weight's FakeQuant
removed, so tf2onnx sees the weight's dequantized value; onnx_kbit then swaps those float initializers for
the codes. The opset is the lowest holding the stored types: 21 (INT4/UINT4, blocked DequantizeLinear), 25
when a 2-bit container is used. Every file is run by onnxruntime with every optimization and compared with
the same file run without: on a disagreement or a failure, the layers are first stored in a form
onnxruntime does not fuse, then (if that is not enough) in 8-bit containers, each layer given back its
fusable k-bit form when the check still passes with it; the reason is recorded per layer. A file that
still disagrees is refused, never written.
"""
import contextlib
import copy

import numpy as np

from tfquant.config import FLOAT_BITS
from tfquant.export import onnx_check, onnx_export, onnx_kbit, onnx_names, onnx_snap, ort_session
from tfquant.export.model_export import ExportError

OPSET_INT4 = 21
OPSET_INT2 = 25
CHECK_IMAGES = 256


def kbit_variables(report, max_bits=onnx_kbit.MAX_KBIT_BITS):
    """The weight variables of the report's quantized weight layers of at most `max_bits` bits."""
    return {layer.weight_variable for layer in report.weight_layers
            if layer.quantized and layer.bits != FLOAT_BITS and layer.bits <= max_bits}


def float_activations(report):
    """Whether the model keeps every activation float: its k-bit ONNX file is then built from the frozen
    inference graph, with no Q/DQ pair, and its 5-8-bit weights are stored as 8-bit codes too."""
    return not any(layer.quantized and layer.bits != FLOAT_BITS for layer in report.activation_layers)


def kbit_tensors(tensors, report, max_bits=onnx_kbit.MAX_KBIT_BITS):
    """{weight variable: QuantizedTensor} of the report's quantized weights of at most `max_bits` bits.

    Args:
      tensors: the packed file's tensors (packed_reader.read_packed_model).
      report: the QuantReport.
      max_bits: the widest weight stored as codes here.
    """
    wanted = kbit_variables(report, max_bits)
    return {t.name: t for t in tensors if t.name in wanted and hasattr(t, "codes")}


def without_weight_fake_quants(graph_def, weight_records, layer_names):
    """A copy of the FakeQuant graph whose weight FakeQuant ops of `layer_names` are Identity ops (their
    weights reach the ops as the dequantized trained values)."""
    names = {record["tensor"].split(":")[0] for record in weight_records if record["layer"] in layer_names}
    result = copy.deepcopy(graph_def)
    for node in result.node:
        if node.name in names:
            source = node.input[0]
            node.op = "Identity"
            del node.input[:]
            node.input.append(source)
            node.attr.clear()
            node.attr["T"].type = 1  # DT_FLOAT
    return result


@contextlib.contextmanager
def _no_conv_batch_norm_fusion():
    """tf2onnx folds a batch norm into the convolution before it, which moves a k-bit weight off its codes
    (a model trained without folding quantizes the kernel itself). The fusion is switched off meanwhile."""
    from tf2onnx.optimizer import back_to_back_optimizer  # pylint: disable=import-outside-toplevel
    functions = back_to_back_optimizer._func_map  # pylint: disable=protected-access
    key = ("Conv", "BatchNormalization")
    saved = functions.pop(key, None)
    try:
        yield
    finally:
        if saved is not None:
            functions[key] = saved


def _converted(graph_def):
    """The tf2onnx model of the graph (opset onnx_export.OPSET) with its 8-bit weights as uint8 codes."""
    tf2onnx = onnx_export._require("tf2onnx")  # pylint: disable=protected-access
    from tfquant.export import inference_graph  # pylint: disable=import-outside-toplevel
    with _no_conv_batch_norm_fusion():
        model, _ = tf2onnx.convert.from_graph_def(
            onnx_export.with_converter_ops(graph_def), input_names=[inference_graph.INPUT_NAME + ":0"],
            output_names=[inference_graph.OUTPUT_NAME + ":0"], opset=onnx_export.OPSET)
    onnx_export.store_weight_codes(model, graph_def)
    return model


def _at_opset(model, opset):
    onnx = onnx_export._require("onnx")  # pylint: disable=protected-access
    from onnx import version_converter  # pylint: disable=import-outside-toplevel
    converted = version_converter.convert_version(model, opset)
    # The IR version that defines the types the opset uses (the converter keeps tf2onnx's older one).
    converted.ir_version = max(converted.ir_version, onnx.helper.find_min_ir_version_for(
        [entry for entry in converted.opset_import if entry.domain in ("", "ai.onnx")]))
    return converted


def _build(bases, tensors, overrides):
    """(serialized model, records, opset, activation quantizers given the trained rounding) with the k-bit
    weights stored under `overrides`."""
    onnx = onnx_export._require("onnx")  # pylint: disable=protected-access
    containers = [overrides.get(name, (None, True))[0] or onnx_kbit.CONTAINER_BITS[t.bits]
                  for name, t in tensors.items()]
    opset = OPSET_INT2 if 2 in containers else OPSET_INT4
    if opset not in bases:
        bases[opset] = _at_opset(bases["source"], opset)
    model = copy.deepcopy(bases[opset])
    records = onnx_kbit.store_kbit_weights(model, tensors, overrides)
    snapped = onnx_snap.snap_activations(model)
    mapping = onnx_names.shorten_names(model, onnx_kbit.METADATA_KEY)
    for record in records.values():
        if "initializer" in record:
            record["codes_initializer"] = mapping[record["initializer"] + "_kbit_codes"]
    onnx.checker.check_model(model)
    return model.SerializeToString(), records, opset, snapped


def export(graph_def, weight_records, report, tensors, check_images):
    """The checked k-bit ONNX model of a FakeQuant inference graph.

    Args:
      graph_def: fake_quant_graph.FakeQuantGraph.graph_def, or for a model with float activations
        (float_activations) the frozen inference graph, whose 5-8-bit weights are then stored as 8-bit codes.
      weight_records: the FakeQuant graph's `weights` records (layer, tensor); [] for the frozen graph.
      report: the QuantReport.
      tensors: the packed file's tensors (read_packed_model).
      check_images: float32 images the check runs (the evaluation data when given).
    Returns:
      (serialized model, summary dict for export.json: opset, weights {variable: record}, check, fallbacks).
    Raises:
      ExportError: no form of the file passes onnxruntime's check.
    """
    kbit = kbit_tensors(tensors, report, 8 if float_activations(report) else onnx_kbit.MAX_KBIT_BITS)
    layers = {layer.name for layer in report.weight_layers if layer.weight_variable in kbit and layer.quantized}
    source = without_weight_fake_quants(graph_def, weight_records, layers)
    bases = {"source": _converted(source)}
    images = np.asarray(check_images, np.float32)[:CHECK_IMAGES]

    def attempt(overrides):
        model, records, opset, snapped = _build(bases, kbit, overrides)
        codes = {name: record.get("codes_initializer", "") for name, record in records.items()}
        return model, records, (opset, snapped), onnx_check.check(model, images, list(codes.values())), codes

    overrides = {}
    model, records, built, result, codes = attempt(overrides)
    first_failure = result["reason"]
    fallbacks = []
    if not result["ok"]:
        for ladder, label in (((None, False), "stored in a form onnxruntime does not fuse"),
                              ((8, True), "stored in an 8-bit container")):
            trial = {name: ladder for name in kbit}
            model, records, built, result, codes = attempt(trial)
            if not result["ok"]:
                continue
            # Give each layer back its own form while the check passes without its fallback; a layer that
            # keeps it records what the check saw with its own form.
            reasons = {}
            for name in list(trial):
                relaxed = {key: value for key, value in trial.items() if key != name}
                candidate = attempt(relaxed)
                if candidate[3]["ok"]:
                    trial = relaxed
                    model, records, built, result, codes = candidate
                else:
                    reasons[name] = candidate[3]["reason"]
            overrides = trial
            fallbacks = [{"variable": name, "fallback": label, "reason": reasons.get(name, first_failure)}
                         for name in trial]
            break
        if not result["ok"]:
            raise ExportError("k-bit ONNX model is not valid: %s, whatever the layers' storage; expected "
                              "onnxruntime to run it as written" % result["reason"])
    for name, record in records.items():
        kernel = result["fused"].get(codes[name])
        record["fused"] = kernel is not None
        if kernel is not None:
            record["kernel"] = kernel
        if name in overrides:
            fallback = next(f for f in fallbacks if f["variable"] == name)
            record["fallback"], record["fallback_reason"] = fallback["fallback"], fallback["reason"]
    read_back = onnx_kbit.read_weight_codes(model)
    for name, tensor in kbit.items():
        if name in read_back and not np.array_equal(read_back[name], tensor.codes):
            raise ExportError("k-bit ONNX model is not valid: the codes of %s read back differ from the checkpoint's; "
                              "expected them equal" % name)
    opset, snapped = built
    summary = {"opset": opset, "codes_equal_checkpoint": sorted(read_back), "weights": records, "fallbacks": fallbacks,
               # Activation QuantizeLinear nodes preceded by the trained graph's rounding (onnx_snap).
               "trained_rounding_quantizers": snapped,
               "check": {"images": int(len(images)), "relative_difference": result["relative_difference"],
                         "top1_agreement": result["top1_agreement"], "first_attempt": first_failure or "passed"}}
    return model, summary


def onnx_file(source, report, packed_path, check_images, input_shape=None):
    """(model.onnx bytes, its export.json record) of an export: the k-bit file when a weight has at most 4
    bits (export), else the uint8-weight Q/DQ file at opset 17 (onnx_export.convert).

    Args:
      source: the FakeQuantGraph, or for a k-bit model with float activations the frozen inference GraphDef.
      report: the QuantReport.
      packed_path: the export's model.tfq.
      check_images: images onnxruntime's check runs (test images, else calibration images); None: seeded
        normal noise of `input_shape` (the check compares the file's two runs, which needs no labels).
      input_shape: [None, H, W, C], used without check images.
    """
    from tfquant.export import packed_reader  # pylint: disable=import-outside-toplevel
    tensors, _ = packed_reader.read_packed_model(packed_path)
    graph_def, weight_records = ((source.graph_def, source.weights) if hasattr(source, "graph_def")
                                 else (source, []))
    if not kbit_tensors(tensors, report):
        model = onnx_export.convert(graph_def)
        return model, {"opset": onnx_export.OPSET, "session": ort_session.describe(),
                       "quantize_dequantize_pairs": list(onnx_export.quantize_linear_pairs(model))}
    synthetic = check_images is None
    if synthetic:
        if input_shape is None:
            raise ExportError("k-bit ONNX export needs images or the input shape to check the file in onnxruntime")
        shape = [CHECK_IMAGES] + [int(d) for d in input_shape[1:]]
        check_images = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    model, summary = export(graph_def, weight_records, report, tensors, check_images)
    summary["check"]["images_source"] = "synthetic (normal noise)" if synthetic else "given"
    summary["quantize_dequantize_pairs"] = list(onnx_export.quantize_linear_pairs(model))
    summary["session"] = ort_session.describe()  # the options the check and the figures used
    return model, summary
