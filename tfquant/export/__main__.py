"""Command line: export a quantized checkpoint to a packed .tfq file, a frozen graph and TFLite models.

  python -m tfquant.export --checkpoint_dir DIR --model resnet_at_fmnist --output_dir OUT \\
      [--resnet_size 20] [--data_dir_local D] [--tflite] [--int8 [--int8_calibration]] [--onnx] \\
      [--eval_subset N] [--debug]

DIR holds quant_report.json and model.ckpt-N (as written by --learner uniform).  OUT receives
model.tfq, inference.pb, model_float.tflite and model_int8.tflite (with --tflite / --int8), model.onnx
(with --onnx: QuantizeLinear/DequantizeLinear pairs with the trained ranges) and export.json, which
records for every file its accuracy and its agreement with the quantized TF graph (the fraction of
test images given the same class).  Everything is built in a sibling staging directory and moved into place with one
rename once complete: a failure leaves OUT as it was (or absent), and a previous export in OUT is
replaced only by a complete new one.
"""
import argparse
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np
import tensorflow as tf

import tfquant
from tfquant import files
from tfquant.export import fake_quant_graph, model_export, onnx_export, packed_file, tflite_export
from tfquant.report import ReportError, config_from_report

tf1 = tf.compat.v1
REPORT_NAME = "quant_report.json"
# model name -> (helper module, takes resnet_size, input shape)
MODELS = {
    "resnet_at_fmnist": ("nets.resnet_at_fmnist", True, [None, 28, 28, 1]),
    "convnet_at_fmnist": ("nets.convnet_at_fmnist", False, [None, 28, 28, 1]),
    "resnet_at_cifar10": ("nets.resnet_at_cifar10", True, [None, 32, 32, 3]),
}
CALIBRATION_IMAGES = 200
LATENCY_IMAGES = 100
# What a previous export may hold; an --output_dir with anything else is refused, never replaced.
EXPORT_FILES = ("model.tfq", "inference.pb", "model_float.tflite", "model_int8.tflite", "model.onnx", "export.json")
STATE_FILE = "checkpoint"


class CommandError(Exception):
    """A bad argument or input; printed as one 'error:' line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, as for every other bad input, instead of argparse's usage block.
        sys.stderr.write("error: %s\n" % message)
        sys.exit(2)


def _parse_args(argv):
    parser = _Parser(prog="python -m tfquant.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", required=True, help="directory with quant_report.json and model.ckpt-N")
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--resnet_size", type=int, default=20, help="ResNet depth (resnet models)")
    parser.add_argument("--data_dir_local", default=None, help="data set directory (default: standard location)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tflite", action="store_true", help="also write model_float.tflite")
    parser.add_argument("--int8", action="store_true", help="also write model_int8.tflite (implies --tflite), "
                        "with the trained weight and activation ranges")
    parser.add_argument("--int8_calibration", action="store_true", help="with --int8: let the converter "
                        "calibrate every activation range on training images instead (the old fallback)")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx with QuantizeLinear/"
                        "DequantizeLinear pairs carrying the trained ranges (needs tf2onnx and onnxruntime)")
    parser.add_argument("--eval_subset", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--latency_images", type=int, default=LATENCY_IMAGES,
                        help="test images per model for the latency measurement")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    for name in ("resnet_size", "eval_subset", "latency_images"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "latency_images" else 0):
            parser.error("--%s=%d is not valid; expected a %s integer"
                         % (name, value, "non-negative" if name == "latency_images" else "positive"))
    return args


def _make_helper(args):
    """(helper, data available, why not); forward_eval works without data."""
    module_name, has_size, _ = MODELS[args.model]
    cls = importlib.import_module(module_name).ModelHelper
    kwargs = dict(data_dir=args.data_dir_local, batch_size=100, batch_size_eval=500,
                  eval_subset=args.eval_subset, seed=0)
    if has_size:
        kwargs["resnet_size"] = args.resnet_size
    try:
        return cls(**kwargs), True, ""
    except ValueError as exc:  # nets' DataError is a ValueError, as is a bad resnet_size
        if has_size and "resnet_size" in str(exc):
            raise CommandError("--resnet_size=%d is not valid: %s" % (args.resnet_size, exc))
        reason = " ".join(str(exc).split())
    # The constructor loads the data set; the forward pass only needs the architecture fields.
    helper = cls.__new__(cls)
    helper.data_dir = args.data_dir_local
    if has_size:
        helper.resnet_size = args.resnet_size
    return helper, False, reason


def _dataset_arrays(build, limit=None, init_attr=None):
    """Run a helper's dataset tensors into NumPy arrays (images, labels)."""
    graph = tf.Graph()
    with graph.as_default():
        images, labels = build()
        init = getattr(build.__self__, init_attr) if init_attr else None
    chunks_x, chunks_y, count = [], [], 0
    with tf1.Session(graph=graph) as sess:
        if init is not None:
            sess.run(init)
        while limit is None or count < limit:
            try:
                x, y = sess.run([images, labels])
            except tf.errors.OutOfRangeError:
                break
            chunks_x.append(x)
            chunks_y.append(y)
            count += len(y)
    if not chunks_x:
        raise CommandError("the data set yielded no images")
    x, y = np.concatenate(chunks_x), np.concatenate(chunks_y)
    return (x[:limit], y[:limit]) if limit else (x, y)


def _quantized_checkpoint_logits(helper, checkpoint, config, images, batch_size=500):
    """Logits of the quantized evaluation graph restored from the checkpoint (the reference)."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None] + list(images.shape[1:]))
        logits = helper.forward_eval(x)
        tfquant.quantize_graph(graph, config, is_training=False)
        saver = tf1.train.Saver()
    outputs = []
    with tf1.Session(graph=graph) as sess:
        saver.restore(sess, checkpoint)
        for start in range(0, len(images), batch_size):
            outputs.append(sess.run(logits, {x: images[start:start + batch_size]}))
    return np.concatenate(outputs)


def _accuracy(logits, labels):
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _check_checkpoint_files(checkpoint_dir):
    """Refuse a state file that is not a regular file: TensorFlow would block forever on a FIFO."""
    state = os.path.join(checkpoint_dir, STATE_FILE)
    if os.path.lexists(state):
        files.regular_file_size(state, CommandError, "checkpoint state file")


def _rebuilt_report(helper, config, input_shape):
    """The report quantize_graph gives this model under `config` (no session, no variables read)."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, input_shape)
        helper.forward_eval(images)
        return tfquant.quantize_graph(graph, config, is_training=False)


def _export(args, staging):
    checkpoint_dir = args.checkpoint_dir
    if not os.path.isdir(checkpoint_dir):
        raise CommandError("--checkpoint_dir=%s is not a directory" % checkpoint_dir)
    report_path = os.path.join(checkpoint_dir, REPORT_NAME)
    if not os.path.lexists(report_path):
        raise CommandError("--checkpoint_dir=%s has no %s; expected the directory of a --learner uniform "
                           "run" % (checkpoint_dir, REPORT_NAME))
    report = model_export.load_report(report_path)
    config = config_from_report(report)
    _check_checkpoint_files(checkpoint_dir)
    try:
        checkpoint = model_export.resolve_checkpoint(checkpoint_dir)
    except (model_export.ExportError, OSError):
        raise
    except Exception as exc:  # pylint: disable=broad-except  (protobuf's ParseError is no ValueError)
        raise CommandError("checkpoint state file %s cannot be read (%s); expected the 'checkpoint' file "
                           "TensorFlow writes" % (os.path.join(checkpoint_dir, STATE_FILE), _one_line(exc)))
    int8 = args.int8
    tflite = args.tflite or int8
    if args.int8_calibration and not int8:
        raise CommandError("--int8_calibration is only valid with --int8")
    if int8 or args.onnx:
        tflite_export.check_int8_compatible(report)
    helper, have_data, why = _make_helper(args)
    if (int8 or args.onnx) and not have_data:
        raise CommandError("--%s needs training images for the ranges training did not record, but the data set "
                           "cannot be loaded: %s" % ("int8" if int8 else "onnx", why))
    input_shape = list(MODELS[args.model][2])
    try:
        rebuilt = _rebuilt_report(helper, config, input_shape)
    except ValueError as exc:
        raise CommandError("%s (does --model%s match the checkpoint?)"
                           % (" ".join(str(exc).split()), "/--resnet_size" if MODELS[args.model][1] else ""))
    model_export.check_report_matches_model(report, rebuilt, report_path)
    result = {"model": args.model, "checkpoint": os.path.abspath(checkpoint), "report": report_path,
              "config": report.config, "files": {}}
    if MODELS[args.model][1]:
        result["resnet_size"] = args.resnet_size
    preprocess = getattr(type(helper), "eval_preprocess", None)
    result["input"] = {"name": model_export.INPUT_NAME, "shape": input_shape, "dtype": "float32",
                       "preprocessing": getattr(preprocess, "__name__", "unknown"),
                       "output": model_export.OUTPUT_NAME}

    def add_file(key, name):
        result["files"][key] = {"name": name, "bytes": os.path.getsize(os.path.join(staging, name))}

    folded = None
    if report.config.get("fold_batch_norms"):
        folded = model_export.folded_weight_values(helper.forward_eval, checkpoint, input_shape)
    stats = model_export.pack_checkpoint(checkpoint, report, os.path.join(staging, "model.tfq"),
                                         metadata={"model": args.model, "input_shape": input_shape},
                                         folded_weights=folded)
    stats.pop("path")
    result["packed"] = stats
    add_file("packed", "model.tfq")
    if not stats["within_bound"]:
        raise CommandError("packed file is %d bytes, above the bound of %.0f bytes"
                           % (stats["file_bytes"], stats["bound_bytes"]))
    weights, _ = model_export.load_packed_weights(os.path.join(staging, "model.tfq"))
    try:
        graph_def = model_export.freeze_inference_graph(helper.forward_eval, weights, report, input_shape)
    except model_export.ExportError as exc:
        raise CommandError("%s (does --model%s match the checkpoint?)"
                           % (exc, "/--resnet_size" if MODELS[args.model][1] else ""))
    # Flushed to disk before the staging directory is published, like every file of the export.
    files.write_atomically(os.path.join(staging, "inference.pb"), graph_def.SerializeToString())
    add_file("frozen_graph", "inference.pb")

    test_images = test_labels = None
    if have_data:
        test_images, test_labels = _dataset_arrays(helper.build_dataset_eval, init_attr="eval_init_op")
        reference = _quantized_checkpoint_logits(helper, checkpoint, config, test_images)
        frozen = model_export.run_graph_def(graph_def, test_images)
        result["test_images"] = int(len(test_labels))
        result["accuracy"] = {"quantized_checkpoint": _accuracy(reference, test_labels),
                              "frozen_graph": _accuracy(frozen, test_labels)}
        result["frozen_vs_checkpoint"] = {
            "argmax_agreement": float(np.mean(frozen.argmax(1) == reference.argmax(1))),
            "max_abs_logit_diff": float(np.max(np.abs(frozen - reference)))}
    else:
        result["data_unavailable"] = why

    models = {}
    if tflite:
        # The float model keeps tfquant's activation quantization, so it predicts as the checkpoint does.
        models["float"] = tflite_export.convert_float(graph_def, input_shape)
        files.write_atomically(os.path.join(staging, "model_float.tflite"), models["float"])
        add_file("tflite_float", "model_float.tflite")
    calibration = ranged = None
    if int8 or args.onnx:
        calibration, _ = _dataset_arrays(helper.build_dataset_train, limit=CALIBRATION_IMAGES)
    if (int8 and not args.int8_calibration) or args.onnx:
        ranged = fake_quant_graph.build(helper.forward_eval, weights, report, input_shape, calibration)
        result["trained_ranges"] = ranged.summary()
    if int8 and args.int8_calibration:
        float_activations = model_export.freeze_inference_graph(
            helper.forward_eval, weights, report, input_shape, quantize_activations=False)
        models["int8"] = tflite_export.convert_int8(float_activations, calibration, report, input_shape,
                                                    num_calibration=CALIBRATION_IMAGES)
        result["int8"] = {"input_output_type": "int8", "calibration_images": int(len(calibration)),
                          "activation_ranges": "calibration fallback: the converter calibrated every range "
                                               "(tfquant activation ops left out)"}
    elif int8:
        models["int8"] = tflite_export.convert_int8_trained(ranged, input_shape)
        result["int8"] = {"input_output_type": "int8", "calibration_images": ranged.calibration_images,
                          "activation_ranges": "trained ranges as FakeQuant ops; tensors training never "
                                               "quantized calibrated (see trained_ranges)"}
    if int8:
        files.write_atomically(os.path.join(staging, "model_int8.tflite"), models["int8"])
        add_file("tflite_int8", "model_int8.tflite")
    if args.onnx:
        onnx_model = onnx_export.convert(ranged.graph_def)
        files.write_atomically(os.path.join(staging, "model.onnx"), onnx_model)
        add_file("onnx", "model.onnx")
        result["onnx"] = {"opset": onnx_export.OPSET,
                          "quantize_dequantize_pairs": list(onnx_export.quantize_linear_pairs(onnx_model))}
    if test_images is not None:
        _fidelity(result, reference, test_labels, test_images, frozen, models,
                  onnx_model if args.onnx else None, args.latency_images)
    files.write_atomically(os.path.join(staging, "export.json"), json.dumps(result, indent=2))
    return result


def _fidelity(result, reference, labels, images, frozen, tflite_models, onnx_model, latency_images):
    """Accuracy, agreement with the quantized TF graph and latency of every exported file, into `result`."""
    predictions = {"frozen_graph": frozen}
    for label, model in tflite_models.items():
        predictions["tflite_" + label] = tflite_export.run_tflite(model, images)
    if onnx_model is not None:
        predictions["onnx"] = onnx_export.run_onnx(onnx_model, images)
    # The share of test images each file gives the class the quantized TF graph gives.
    result["agreement_with_quantized_tf"] = {
        label: float(np.mean(logits.argmax(1) == reference.argmax(1))) for label, logits in predictions.items()}
    for label, logits in predictions.items():
        result["accuracy"][label] = _accuracy(logits, labels)
    runners = dict(tflite_models)
    if onnx_model is not None:
        runners["onnx"] = onnx_export.single_image_runner(onnx_model)
    if runners and latency_images > 0:
        before = os.getloadavg()
        latency = tflite_export.measure_latency(runners, images[:latency_images])
        latency["load_average_1_5_15_min"] = {"before": list(before), "after": list(os.getloadavg())}
        if "float" in latency and "int8" in latency:
            latency["float_over_int8_median"] = latency["float"]["median_ms"] / latency["int8"]["median_ms"]
            latency["int8_over_float_median"] = latency["int8"]["median_ms"] / latency["float"]["median_ms"]
        result["latency"] = latency


def _existing_ancestor(path):
    """The nearest existing directory at or above `path` (staging goes there: same file system)."""
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(output_dir, root):
    """Remove staging directories of killed exports of `output_dir`; restore a previous export set aside."""
    base = os.path.basename(output_dir)
    pattern = re.compile(r"^\.%s\.(export|old)-(\d+)-" % re.escape(base))
    for name in sorted(os.listdir(root)):
        found = pattern.match(name)
        if not found or _process_alive(int(found.group(2))):
            continue
        path = os.path.join(root, name)
        if found.group(1) == "old" and root == os.path.dirname(output_dir) and not os.path.lexists(output_dir):
            os.rename(path, output_dir)  # killed between setting the old export aside and moving the new one in
        else:
            shutil.rmtree(path, ignore_errors=True)


def _check_output_dir(output_dir, given):
    """Refuse an --output_dir that holds anything but a previous export (it would be replaced)."""
    if not os.path.lexists(output_dir):
        return
    if not os.path.isdir(output_dir) or os.path.islink(output_dir):
        raise CommandError("--output_dir=%s exists and is not a directory; expected a new directory or a "
                           "previous export" % given)
    foreign = sorted(set(os.listdir(output_dir)) - set(EXPORT_FILES))
    if foreign:
        raise CommandError("--output_dir=%s holds %s, which is not part of an export; expected a new or empty "
                           "directory or a previous export (it is replaced as a whole)" % (given, foreign[0]))


def _publish(staging, output_dir):
    """Move the complete staging directory to `output_dir`, replacing a previous export only then."""
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    if not os.path.lexists(output_dir):
        os.rename(staging, output_dir)
        return
    old = tempfile.mkdtemp(prefix=".%s.old-%d-" % (os.path.basename(output_dir), os.getpid()),
                           dir=os.path.dirname(output_dir))
    os.rmdir(old)  # only the unique name is wanted; rename needs a free target
    os.rename(output_dir, old)
    try:
        os.rename(staging, output_dir)
    except BaseException:
        os.rename(old, output_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _one_line(exc):
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, tf.errors.OpError):
        text = " ".join((exc.message or text).split())
    return text


# Everything a damaged or foreign input can raise; TypeError/KeyError/IndexError stay in the list as a
# safety net for inputs no check anticipated (--debug shows their traceback).
USER_ERRORS = (CommandError, onnx_export.OnnxUnavailableError, model_export.ExportError, packed_file.PackedFileError, ReportError, ValueError, OSError,
               tf.errors.OpError, TypeError, KeyError, IndexError)


def main(argv=None):
    """Run the export; returns the exit status (0, or 2 after one 'error:' line on stderr)."""
    args = _parse_args(argv)
    # TensorFlow's deprecation notices for the TF1 freezing API are not the user's concern.
    tf.get_logger().setLevel("ERROR")
    output_dir = os.path.abspath(args.output_dir)
    staging = None
    try:
        _check_output_dir(output_dir, args.output_dir)
        root = _existing_ancestor(os.path.dirname(output_dir))
        _clean_stale(output_dir, root)
        staging = tempfile.mkdtemp(prefix=".%s.export-%d-" % (os.path.basename(output_dir), os.getpid()),
                                   dir=root)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the export's mode
        start = time.time()
        result = _export(args, staging)
        _publish(staging, output_dir)
        staging = None
    except USER_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write("error: %s\n" % _one_line(exc))
        return 2
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    print("wrote %s in %.0f s" % (", ".join(sorted(f["name"] for f in result["files"].values())),
                                  time.time() - start))
    packed = result["packed"]
    print("packed model: %d bytes (bound %.0f, float32 model %.0f bytes, %.2fx smaller)"
          % (packed["file_bytes"], packed["bound_bytes"], packed["float_storage_bits"] / 8.0,
             packed["compression_ratio"]))
    agreement = result.get("agreement_with_quantized_tf", {})
    latency = result.get("latency", {})
    if result.get("accuracy"):
        print("%-22s %9s %22s %16s" % ("model", "accuracy", "agreement with TF graph", "latency ms/image"))
    for label, value in result.get("accuracy", {}).items():
        timing = latency.get(label.replace("tflite_", ""), {}).get("median_ms")
        print("%-22s %9.4f %22s %16s" % (label, value,
                                         "%.4f" % agreement[label] if label in agreement else "-",
                                         "%.3f" % timing if timing is not None else "-"))
    if latency:
        load = latency["load_average_1_5_15_min"]
        print("latency: median per image, batch 1, one thread, measured alternately; load average %.2f before, "
              "%.2f after" % (load["before"][0], load["after"][0]))
    print("details: %s" % os.path.join(output_dir, "export.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
