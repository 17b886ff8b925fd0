"""Export a quantized run directory (checkpoint, report, inference graph) into a directory of deployable files.

The run directory holds what a quantized run writes: `quant_report.json`, `inference_graph.meta` and
`model.ckpt-N`. The output directory receives model.tfq, inference.pb, model_float.tflite,
model_int8.tflite, model_int4.tflite (<= 4-bit symmetric weights) and model.onnx (k-bit weights as their codes,
onnx_kbit_export) when asked for, and export.json, which records for every file its accuracy
and its agreement with the quantized TF graph (the share of test images given the same class). Everything
is built in a sibling staging directory and moved into place with one rename once complete: a failure
leaves the output directory as it was (or absent), and a previous export there is replaced only by a
complete new one. No model code is needed: the forward pass comes from the saved inference graph.
"""
import contextlib
import dataclasses
import json
import os
import shutil

import numpy as np
import tensorflow as tf

import tfquant
from tfquant import export_command, files
from tfquant.export import (divergence, fake_quant_graph, frozen_graph, inference_graph, model_export, model_files,
                            onnx_export, onnx_kbit_export, packed_reader, staged_directory, tflite_export, tflite_int4)
from tfquant.export.model_export import ExportError
from tfquant.report import REPORT_NAME, config_from_report, load_report

tf1 = tf.compat.v1
CALIBRATION_IMAGES = 200
# The latency label of the float TFLite model run without the XNNPACK delegate.
FLOAT_BUILTIN = "float_builtin_kernels"
LATENCY_IMAGES = 100
# Test images whose every int8 intermediate tensor is compared with the TF graph's (all are held in memory).
DIVERGENCE_IMAGES = 200
# What a previous export may hold; an output directory with anything else is refused, never replaced.
EXPORT_FILES = ("model.tfq", "inference.pb", "model_float.tflite", "model_int8.tflite", "model_int4.tflite",
                "model.onnx", "export.json")
STATE_FILE = "checkpoint"


@dataclasses.dataclass(frozen=True)
class _Options:
    """Which files to write besides model.tfq and inference.pb, and how many images to time."""

    tflite: bool
    int8: bool
    int8_calibration: bool
    onnx: bool
    latency_images: int


def one_line(exc):
    """The message of `exc` on one line (TensorFlow's OpError reduced to its cause, op and file)."""
    if isinstance(exc, (tf.errors.OpError, OSError)):
        return files.describe_error(exc)
    return " ".join(str(exc).split()) or type(exc).__name__


def _quantized_checkpoint_logits(build_forward, checkpoint, config, images, batch_size=500):
    """Logits of the quantized evaluation graph restored from the checkpoint (the reference)."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None] + list(images.shape[1:]))
        logits = build_forward(x)
        logits = tfquant.quantize_graph(graph, config, is_training=False).output(logits)
        saver = tf1.train.Saver(tf1.global_variables())
    outputs = []
    with tf1.Session(graph=graph) as sess:
        saver.restore(sess, checkpoint)
        for start in range(0, len(images), batch_size):
            outputs.append(sess.run(logits, {x: images[start:start + batch_size]}))
    return np.concatenate(outputs)


def accuracy(logits, labels, what="the quantized checkpoint"):
    """Share of images whose top logit is the label; ExportError when any logit is NaN or Inf (no accuracy then)."""
    bad = int(np.count_nonzero(~np.all(np.isfinite(logits.reshape(len(logits), -1)), axis=1)))
    if bad:
        raise ExportError("%s gives NaN or infinite logits for %d of %d test images, so no accuracy is reported; "
                          "expected finite outputs" % (what, bad, len(logits)))
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _rebuilt_report(build_forward, config, input_shape):
    """The report quantize_graph gives the saved forward pass under `config` (no session, no variables read)."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, input_shape)
        build_forward(images)
        return tfquant.quantize_graph(graph, config, is_training=False)


def _resolve_checkpoint(checkpoint_dir):
    """The latest checkpoint of the run directory; a state file that is no regular file is refused."""
    state = os.path.join(checkpoint_dir, STATE_FILE)
    if os.path.lexists(state):
        # TensorFlow would block forever on a FIFO.
        files.regular_file_size(state, ExportError, "checkpoint state file")
    try:
        return model_export.resolve_checkpoint(checkpoint_dir)
    except (ExportError, OSError):
        raise
    except Exception as exc:  # pylint: disable=broad-except  (protobuf's ParseError is no ValueError)
        raise ExportError("checkpoint state file=%s is not valid (%s); expected the 'checkpoint' file TensorFlow "
                          "writes" % (state, one_line(exc))) from None


def _check_data(test_data, calibration_images, input_shape):
    """Test images/labels and calibration images as float32/int64 arrays of the model's input shape."""
    def images_of(name, value):
        value = np.asarray(value)
        if value.dtype.kind not in "fiu" or list(value.shape[1:]) != list(input_shape[1:]) or not len(value):
            raise ExportError("%s=array of shape %s and dtype %s is not valid; expected a non-empty float array "
                              "of shape [N] + %s" % (name, list(value.shape), value.dtype, list(input_shape[1:])))
        with np.errstate(over="ignore", invalid="ignore"):
            converted = value.astype(np.float32, copy=False)
        # Checked after the cast: float64 1e300 becomes inf in float32, and every logit after it NaN.
        bad = int(np.size(converted) - np.count_nonzero(np.isfinite(converted)))
        if bad:
            overflow = int(np.count_nonzero(np.isfinite(value) & ~np.isfinite(converted))) if value.dtype.kind == "f" \
                else 0
            raise ExportError("%s=array of dtype %s is not valid: %d values are NaN or infinite as float32%s; expected "
                              "finite images" % (name, value.dtype, bad, " (%d of them overflow it)" % overflow
                                                 if overflow else ""))
        return converted

    if test_data is not None:
        images, labels = images_of("test images", test_data[0]), np.asarray(test_data[1])
        if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
            raise ExportError("test labels=array of shape %s and dtype %s is not valid; expected %d integer labels"
                              % (list(labels.shape), labels.dtype, len(images)))
        test_data = images, labels.astype(np.int64)
    if calibration_images is not None:
        calibration_images = images_of("calibration images", calibration_images)[:CALIBRATION_IMAGES]
    return test_data, calibration_images


def _export(checkpoint_dir, staging, options, test_data, calibration_images):
    if not os.path.isdir(checkpoint_dir):
        raise ExportError("checkpoint_dir=%s is not valid; expected a directory" % checkpoint_dir)
    report_path = os.path.join(checkpoint_dir, REPORT_NAME)
    graph_path = os.path.join(checkpoint_dir, inference_graph.INFERENCE_GRAPH_NAME)
    for path in (report_path, graph_path):
        if not os.path.lexists(path):
            raise ExportError("checkpoint_dir=%s has no %s; expected the directory of a quantized run "
                              "(--learner uniform or ptq)" % (checkpoint_dir, os.path.basename(path)))
    report = load_report(report_path)
    config = config_from_report(report)
    checkpoint = _resolve_checkpoint(checkpoint_dir)
    int8, onnx = options.int8, options.onnx
    if options.int8_calibration and not int8:
        raise ExportError("int8_calibration=True is not valid without int8; expected int8=True too")
    if int8 or onnx:
        tflite_export.check_int8_compatible(report)
    saved_graph = inference_graph.InferenceGraph(graph_path)
    build_forward, input_shape = saved_graph.build_forward, saved_graph.input_shape
    test_data, calibration_images = _check_data(test_data, calibration_images, input_shape)
    # Only moving-average ranges are the runtimes' grid (learned LSQ steps and offsets are not: calibrate them).
    needs_calibration = (options.int8_calibration or not report.config.get("quantize_layer_outputs")
                         or report.config.get("act_range", "ema") != "ema")
    # A k-bit ONNX file of a model with float activations is built from the frozen graph: no range to calibrate.
    onnx_from_frozen = (onnx and bool(onnx_kbit_export.kbit_variables(report))
                        and onnx_kbit_export.float_activations(report))
    if (int8 or (onnx and not onnx_from_frozen)) and calibration_images is None and needs_calibration:
        raise ExportError("%s export needs calibration images; expected training (or test) images for the ranges "
                          "training did not record" % ("int8" if int8 else "ONNX"))
    try:
        rebuilt = _rebuilt_report(build_forward, config, input_shape)
    except ValueError as exc:
        raise ExportError("%s (is %s the graph of this checkpoint?)" % (one_line(exc), graph_path)) from None
    model_export.check_report_matches_model(report, rebuilt, report_path)
    result = {"checkpoint": os.path.abspath(checkpoint), "report": report_path,
              "inference_graph": os.path.abspath(graph_path), "config": report.config, "files": {},
              "input": {"name": inference_graph.INPUT_NAME, "shape": input_shape, "dtype": "float32",
                        "output": inference_graph.OUTPUT_NAME}}

    def add_file(key, name, content=None):
        if content is not None:
            # Flushed to disk before the staging directory is published, like every file of the export.
            files.write_atomically(os.path.join(staging, name), content)
        with open(os.path.join(staging, name), "rb") as handle:
            data = handle.read()
        # Size and digest: a file read back later (model_files.load_export) is checked against them.
        result["files"][key] = {"name": name, "bytes": len(data), "sha256": model_files.digest(data)}

    folded = None
    if report.config.get("fold_batch_norms"):
        folded = frozen_graph.folded_weight_values(build_forward, checkpoint, input_shape)
    stats = model_export.pack_checkpoint(checkpoint, report, os.path.join(staging, "model.tfq"),
                                         metadata={"input_shape": input_shape}, folded_weights=folded)
    stats.pop("path")
    result["packed"] = stats
    add_file("packed", "model.tfq")
    if not stats["within_bound"]:
        raise ExportError("packed file=%d bytes is not valid; expected at most the bound of %.0f bytes"
                          % (stats["file_bytes"], stats["bound_bytes"]))
    weights, _ = model_export.load_packed_weights(os.path.join(staging, "model.tfq"))
    graph_def = frozen_graph.freeze_inference_graph(build_forward, weights, report, input_shape)
    # Deterministic: map fields (node attributes) in key order, so two exports are byte-identical.
    add_file("frozen_graph", "inference.pb", graph_def.SerializeToString(deterministic=True))

    reference = frozen = None
    if test_data is not None:
        test_images, test_labels = test_data
        reference = _quantized_checkpoint_logits(build_forward, checkpoint, config, test_images)
        frozen = frozen_graph.run_graph_def(graph_def, test_images)
        result["test_images"] = int(len(test_labels))
        result["accuracy"] = {"quantized_checkpoint": accuracy(reference, test_labels),
                              "frozen_graph": accuracy(frozen, test_labels, "the frozen graph")}
        result["frozen_vs_checkpoint"] = {
            "argmax_agreement": float(np.mean(frozen.argmax(1) == reference.argmax(1))),
            "max_abs_logit_diff": float(np.max(np.abs(frozen - reference)))}
    else:
        result["data_unavailable"] = "no test data given"

    models = {}
    if options.tflite or int8:
        # The float model keeps tfquant's activation quantization, so it predicts as the checkpoint does.
        models["float"] = tflite_export.convert_float(graph_def, input_shape)
        add_file("tflite_float", "model_float.tflite", models["float"])
    ranged = None
    # The packed file's codes and steps, read once for the biases' int32 grid and the INT4 weights.
    packed_tensors = packed_reader.read_packed_model(os.path.join(staging, "model.tfq"))[0] if int8 or onnx else None
    if (int8 and not options.int8_calibration) or (onnx and not onnx_from_frozen):
        ranged = fake_quant_graph.build(build_forward, weights, report, input_shape, calibration_images,
                                        weight_steps=fake_quant_graph.packed_steps(packed_tensors))
        result["trained_ranges"] = ranged.summary()
        untrained = ranged.not_as_trained()
        if untrained:
            result["not_as_trained"] = untrained
    if int8 and options.int8_calibration:
        float_activations = frozen_graph.freeze_inference_graph(
            build_forward, weights, report, input_shape, quantize_activations=False)
        models["int8"] = tflite_export.convert_int8(float_activations, calibration_images, report, input_shape,
                                                    num_calibration=CALIBRATION_IMAGES)
        result["int8"] = {"input_output_type": "int8", "calibration_images": int(len(calibration_images)),
                          "activation_ranges": "calibration fallback: the converter calibrated every range "
                                               "(tfquant activation ops left out)"}
    elif int8:
        models["int8"] = tflite_export.convert_int8_trained(ranged, input_shape)
        result["int8"] = {"input_output_type": "int8", "calibration_images": ranged.calibration_images,
                          "activation_ranges": "trained ranges as FakeQuant ops; tensors training never "
                                               "quantized calibrated (see trained_ranges)"}
    if int8:
        not_int4 = tflite_int4.eligible(report) if not options.int8_calibration else "int8_calibration"
        if not not_int4:
            # The converter writes <= 4-bit weights INT4 itself, off a 2-3-bit grid: the int8 file gets the
            # trained codes as int8, model_int4.tflite as INT4.
            models["int8"], result["int8"]["weights"] = tflite_int4.to_int4(models["int8"], packed_tensors, report,
                                                                            "INT8")
            models["int4"], records = tflite_int4.to_int4(models["int8"], packed_tensors, report)
            add_file("tflite_int4", "model_int4.tflite", models["int4"])
            result["int4"] = {"weights": records, "bytes_over_int8": len(models["int4"]) / len(models["int8"])}
        else:
            result["int4"] = {"not_written": not_int4}
        add_file("tflite_int8", "model_int8.tflite", models["int8"])
    onnx_model = None
    if onnx:
        onnx_model, result["onnx"] = onnx_kbit_export.onnx_file(
            ranged if not onnx_from_frozen else graph_def, report, os.path.join(staging, "model.tfq"),
            test_data[0] if test_data is not None else calibration_images, input_shape)
        add_file("onnx", "model.onnx", onnx_model)
        result["onnx"]["bytes_over_accounted"] = result["files"]["onnx"]["bytes"] / (report.total_storage_bits / 8.0)
    if test_data is not None:
        _fidelity(result, reference, test_data, frozen, models, onnx_model, options.latency_images)
        if int8 and not options.int8_calibration:
            images = test_data[0][:DIVERGENCE_IMAGES]
            result["int8_layer_divergence"] = {
                "images": int(len(images)), "kernels": "built-in (no delegate)",
                "layers": divergence.layer_divergence(ranged.graph_def, models["int8"], images)}
    files.write_atomically(os.path.join(staging, "export.json"), json.dumps(result, indent=2).encode())
    return result


def _not_as_trained_line(untrained):
    parts = ["weights re-gridded to 8-bit symmetric: %s" % "; ".join(
        "%s (%s)" % (", ".join(layers[:3]) + (" and %d more" % (len(layers) - 3) if len(layers) > 3 else ""), reason)
        for reason, layers in sorted(untrained.get("weights", {}).items()))] if untrained.get("weights") else []
    calibrated = untrained.get("calibrated", [])
    if calibrated:
        parts.append("%d ranges calibrated that training never quantized (%s%s)" % (
            len(calibrated), ", ".join(calibrated[:3]), ", ..." if len(calibrated) > 3 else ""))
    return ("warning: the int8 / ONNX files do not compute the trained graph exactly: %s; their predictions can "
            "differ from the quantized model's (export.json: not_as_trained)" % "; ".join(parts))


def _fidelity(result, reference, test_data, frozen, tflite_models, onnx_model, latency_images):
    """Accuracy, agreement with the quantized TF graph and latency of every exported file, into `result`."""
    images, labels = test_data
    predictions = {"frozen_graph": frozen}
    for label, model in tflite_models.items():
        predictions["tflite_" + label] = tflite_export.run_tflite(model, images)
    if onnx_model is not None:
        predictions["onnx"] = onnx_export.run_onnx(onnx_model, images)
    # The share of test images each file gives the class the quantized TF graph gives.
    result["agreement_with_quantized_tf"] = {
        label: float(np.mean(logits.argmax(1) == reference.argmax(1))) for label, logits in predictions.items()}
    result["disagreements_with_quantized_tf"] = {
        label: divergence.disagreements(reference, logits) for label, logits in predictions.items()}
    for label, logits in predictions.items():
        result["accuracy"][label] = accuracy(logits, labels, "the exported %s model" % label)
    runners = dict(tflite_models)
    if "float" in tflite_models:
        # The float model on the built-in kernels too: the speed-up of int8 over float depends on whether
        # the runtime has XNNPACK (on x86 without VNNI its float kernels are as fast as its int8 ones).
        runners[FLOAT_BUILTIN] = tflite_export.single_image_runner(tflite_models["float"], default_delegates=False)
    if onnx_model is not None:
        runners["onnx"] = onnx_export.single_image_runner(onnx_model)
    if runners and latency_images > 0:
        before = os.getloadavg()
        latency = tflite_export.measure_latency(runners, images[:latency_images])
        latency["load_average_1_5_15_min"] = {"before": list(before), "after": list(os.getloadavg())}
        if "float" in latency and "int8" in latency:
            latency["float_over_int8_median"] = latency["float"]["median_ms"] / latency["int8"]["median_ms"]
            latency["int8_over_float_median"] = latency["int8"]["median_ms"] / latency["float"]["median_ms"]
            latency["int8_over_float_builtin_median"] = (latency["int8"]["median_ms"]
                                                         / latency[FLOAT_BUILTIN]["median_ms"])
        result["latency"] = latency


def _check_output_dir(output_dir, given):
    """Refuse an output directory that holds anything but a previous export (it would be replaced)."""
    ancestor = os.path.dirname(output_dir)
    while ancestor != os.path.dirname(ancestor):
        if os.path.lexists(ancestor) and not os.path.isdir(ancestor):
            raise ExportError("%s is not valid: %s is a file, not a directory; expected a path whose parents are "
                              "directories" % (given, ancestor))
        ancestor = os.path.dirname(ancestor)
    if not os.path.lexists(output_dir):
        return
    if not os.path.isdir(output_dir) or os.path.islink(output_dir):
        raise ExportError("%s is not valid: it exists and is not a directory; expected a new directory or a "
                          "previous export" % given)
    foreign = sorted(set(os.listdir(output_dir)) - set(EXPORT_FILES))
    if foreign:
        raise ExportError("%s holds %s, which is not part of an export; expected a new or empty "
                          "directory or a previous export (it is replaced as a whole)" % (given, foreign[0]))


def export_run_directory(checkpoint_dir, output_dir, tflite=False, int8=False, int8_calibration=False, onnx=False,
                         test_data=None, calibration_images=None, latency_images=LATENCY_IMAGES, output_name=None):
    """Export the latest checkpoint of a quantized run directory, all or nothing.

    Args:
      checkpoint_dir: directory with quant_report.json, inference_graph.meta and model.ckpt-N.
      output_dir: receives model.tfq, inference.pb, [model_float.tflite, model_int8.tflite, model.onnx,]
        export.json.
      tflite: also write model_float.tflite.
      int8: also write model_int8.tflite (implies tflite) with the trained weight and activation ranges;
        needs `calibration_images` for the tensors training never quantized. With every weight at <= 4 bits on
        the symmetric grid also model_int4.tflite (tflite_int4).
      int8_calibration: with int8, let the converter calibrate every activation range instead.
      onnx: also write model.onnx (QuantizeLinear/DequantizeLinear pairs with the trained ranges, weights of
        <= 4 bits as UINT4/UINT2 codes checked in onnxruntime; needs onnx, tf2onnx and onnxruntime); needs
        `calibration_images` as int8 does, unless the model keeps every activation float.
      test_data: optional (images, labels) of preprocessed test images in the model's input shape; with
        it export.json records the accuracy of the checkpoint and of every exported file, and every file's
        agreement with the quantized TF graph.
      calibration_images: images for the ranges training did not record (first CALIBRATION_IMAGES used).
      latency_images: test images per model for the per-image latency (0: not measured).
      output_name: how the output directory is named in messages (default: 'output_dir=<path>').
    Returns:
      the dict written to export.json.
    Raises:
      ExportError, ReportError, PackedFileError, InferenceGraphError (ValueErrors with one-line messages),
      onnx_export.OnnxUnavailableError, OSError, tf.errors.OpError.
    """
    options = _Options(tflite, int8, int8_calibration, onnx, latency_images)
    output_dir = os.path.abspath(output_dir)
    given = output_name or "output_dir=" + output_dir
    staging = None
    try:
        _check_output_dir(output_dir, given)
        with _locked_run_directory(checkpoint_dir):
            staging = staged_directory.create(output_dir)
            result = _export(checkpoint_dir, staging, options, test_data, calibration_images)
            staged_directory.publish(staging, output_dir)
            staging = None
    except OSError as exc:
        raise ExportError(staged_directory.failure_message(exc, staging, output_dir, given)) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return result


@contextlib.contextmanager
def _locked_run_directory(checkpoint_dir):
    """One process per run directory: an export holds its lock while it runs, as training does."""
    if not os.path.isdir(checkpoint_dir):
        yield  # _export says what is wrong with it
        return
    held_before = files.holds_lock(checkpoint_dir)
    try:
        files.lock_directory(checkpoint_dir)
    except files.DirectoryInUse as exc:
        raise ExportError(export_command.in_use_message(checkpoint_dir, exc.pid, exc.directory)) from None
    try:
        yield
    finally:
        if not held_before:
            files.release_directory(checkpoint_dir)


def summary_lines(result, output_dir):
    """The lines a command prints after an export: files, packed size, `accuracy <file kind> <value>`,
    each file's agreement with the quantized TF graph and its latency."""
    packed = result["packed"]
    lines = ["wrote %s" % ", ".join(sorted(f["name"] for f in result["files"].values())),
             "packed model: %d bytes (bound %.0f, float32 model %.0f bytes, %.2fx smaller)"
             % (packed["file_bytes"], packed["bound_bytes"], packed["float_storage_bits"] / 8.0,
                packed["compression_ratio"])]
    lines.extend("accuracy %-22s %.4f" % (label, value) for label, value in result.get("accuracy", {}).items())
    differ = result.get("disagreements_with_quantized_tf", {})
    lines.extend("agreement with TF graph %-22s %.4f%s" % (
        label, value, " (%d images differ, %d of them with tied top logits)"
        % (differ[label]["images"], differ[label]["tied"]) if differ.get(label, {}).get("images") else "")
        for label, value in result.get("agreement_with_quantized_tf", {}).items())
    compared = [r for r in result.get("int8_layer_divergence", {}).get("layers", [])
                if r["differ"] is not None and r["op"] != divergence.INPUT]
    if compared:
        lines.append("int8 codes that differ from the TF graph's: %.2f %% of the first operator's output, "
                     "%.2f %% of the model's (each tensor in export.json: int8_layer_divergence)"
                     % (100 * compared[0]["differ"], 100 * compared[-1]["differ"]))
    latency = result.get("latency", {})
    for label, timing in latency.items():
        if isinstance(timing, dict) and "median_ms" in timing:
            lines.append("latency %-22s %.3f ms per image" % (label, timing["median_ms"]))
    if latency:
        load = latency["load_average_1_5_15_min"]
        lines.append("latency: median per image, batch 1, one thread, measured alternately; load average %.2f "
                     "before, %.2f after" % (load["before"][0], load["after"][0]))
    lines.extend(_kbit_lines(result))
    if result.get("not_as_trained"):
        lines.append(_not_as_trained_line(result["not_as_trained"]))
    lines.append("details: %s" % os.path.join(os.path.abspath(output_dir), "export.json"))
    return lines


def _kbit_lines(result):
    """What the k-bit files hold: stored types, MatMulNBits fusions, fallbacks, INT4 weights."""
    lines = []
    onnx = result.get("onnx", {})
    if "weights" in onnx:
        types = {}
        for record in onnx["weights"].values():
            types[record["stored_type"]] = types.get(record["stored_type"], 0) + 1
        lines.append("k-bit ONNX (opset %d): weights %s; %d fused into MatMulNBits; %d fallbacks; %.2fx the "
                     "accounted size" % (onnx["opset"], ", ".join("%d %s" % (n, t) for t, n in sorted(types.items())),
                                         sum(bool(r.get("fused")) for r in onnx["weights"].values()),
                                         len(onnx["fallbacks"]), onnx["bytes_over_accounted"]))
    int4 = result.get("int4", {})
    if "weights" in int4:
        stored = [r["stored"] for r in int4["weights"] if r["layer"]]
        lines.append("model_int4.tflite: %d weights INT4, %d int8 (%.2fx the int8 file)"
                     % (stored.count("INT4"), stored.count("INT8"), int4["bytes_over_int8"]))
    elif "not_written" in int4:
        lines.append("model_int4.tflite not written: %s" % int4["not_written"])
    return lines
