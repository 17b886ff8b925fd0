"""Command line: export a quantized run directory to a packed .tfq file, a frozen graph, TFLite and ONNX models.

  python -m tfquant.export --checkpoint_dir DIR --output_dir OUT [--eval_npz TEST.npz] [--tflite]
      [--int8 [--int8_calibration]] [--onnx] [--eval_subset N] [--latency_images N] [--debug]

DIR is the directory a quantized run (--learner uniform or ptq) wrote: quant_report.json,
inference_graph.meta and model.ckpt-N. No model code is needed. OUT receives model.tfq, inference.pb,
model_float.tflite and model_int8.tflite (with --tflite / --int8; int8 with the trained ranges, or every
activation range calibrated by the converter with --int8_calibration; with weights of <= 4 bits on the
symmetric grid also model_int4.tflite, its FULLY_CONNECTED and CONV_2D weights INT4 tensors of the trained codes),
model.onnx (with --onnx: QuantizeLinear/DequantizeLinear pairs with the trained ranges; weights of <= 4 bits as
their trained codes in UINT4/UINT2 initializers, checked in onnxruntime with every optimization) and export.json. TEST.npz holds x_test
(preprocessed images in the model's input shape) and y_test (integer labels), and optionally x_train for the
ranges training did not record (else its first test images serve); with it the accuracy of the checkpoint
and of every file, and every file's agreement with the quantized TF graph, are printed.
The output directory is replaced only by a complete export; a failure leaves it as it was.
"""
import argparse
import sys
import time
import traceback
import zipfile

import numpy as np
import tensorflow as tf

from tfquant import files
from tfquant.errors import TfquantError
from tfquant.export import model_export, run_directory

NPZ_KEYS = ("x_test", "y_test")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, as for every other bad input, instead of argparse's usage block.
        sys.stderr.write("error: %s\n" % message)
        sys.exit(2)


def _parse_args(argv):
    parser = _Parser(prog="python -m tfquant.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", required=True,
                        help="directory with quant_report.json, inference_graph.meta and model.ckpt-N")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--eval_npz", default=None,
                        help=".npz with x_test, y_test (and optionally x_train for --int8/--onnx calibration)")
    parser.add_argument("--tflite", action="store_true", help="also write model_float.tflite")
    parser.add_argument("--int8", action="store_true", help="also write model_int8.tflite (implies --tflite), "
                        "with the trained weight and activation ranges, and for <= 4-bit symmetric weights "
                        "model_int4.tflite (INT4 weights of the trained codes)")
    parser.add_argument("--int8_calibration", action="store_true", help="with --int8: let the converter "
                        "calibrate every activation range on the calibration images instead (the old fallback)")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx with QuantizeLinear/"
                        "DequantizeLinear pairs carrying the trained ranges, <= 4-bit weights as UINT4/UINT2 codes "
                        "(needs onnx, tf2onnx and onnxruntime)")
    parser.add_argument("--eval_subset", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--latency_images", type=int, default=run_directory.LATENCY_IMAGES,
                        help="test images per model for the latency measurement")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    for name, minimum in (("eval_subset", 1), ("latency_images", 0)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error("--%s=%d is not valid; expected an integer >= %d" % (name, value, minimum))
    if args.int8_calibration and not args.int8:
        parser.error("--int8_calibration is only valid with --int8")
    return args


def _load_npz(path, eval_subset):
    """((x_test, y_test) limited to eval_subset, calibration images: x_train or x_test) from an .npz file."""
    files.regular_file_size(path, model_export.ExportError, "--eval_npz file")  # a FIFO would block np.load
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in NPZ_KEYS if key not in data.files]
            if missing:
                raise model_export.ExportError("--eval_npz=%s is not valid: it has no array %r; expected x_test and "
                                               "y_test (and optionally x_train)" % (path, missing[0]))
            images, labels = data["x_test"][:eval_subset], data["y_test"][:eval_subset]
            calibration = data["x_train"] if "x_train" in data.files else images
            calibration = calibration[:run_directory.CALIBRATION_IMAGES]
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError) as exc:
        if isinstance(exc, model_export.ExportError):
            raise
        raise model_export.ExportError("--eval_npz=%s is not valid (%s); expected a NumPy .npz file"
                                       % (path, run_directory.one_line(exc))) from None
    return (images, labels), calibration


# Everything a damaged or foreign input can raise; TypeError/KeyError/IndexError stay in the list as a
# safety net for inputs no check anticipated (--debug shows their traceback).
USER_ERRORS = (TfquantError, ValueError, OSError, tf.errors.OpError, TypeError, KeyError, IndexError)


def main(argv=None):
    """Run the export; returns the exit status (0, or 2 after one 'error:' line on stderr)."""
    args = _parse_args(argv)
    # TensorFlow's deprecation notices for the TF1 freezing API are not the user's concern.
    tf.get_logger().setLevel("ERROR")
    start = time.time()
    try:
        test_data = calibration = None
        if args.eval_npz is not None:
            test_data, calibration = _load_npz(args.eval_npz, args.eval_subset)
        result = run_directory.export_run_directory(
            args.checkpoint_dir, args.output_dir, tflite=args.tflite, int8=args.int8,
            int8_calibration=args.int8_calibration, onnx=args.onnx, test_data=test_data,
            calibration_images=calibration, latency_images=args.latency_images,
            output_name="--output_dir=" + args.output_dir)
    except USER_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write("error: %s\n" % run_directory.one_line(exc))
        return 2
    lines = run_directory.summary_lines(result, args.output_dir)
    lines[0] += " in %.0f s" % (time.time() - start)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
