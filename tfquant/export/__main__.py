"""Command line: export a quantized run directory to a packed .tfq file, a frozen graph, TFLite and ONNX models.

  python -m tfquant.export --checkpoint_dir DIR --output_dir OUT [--eval_npz TEST.npz] [--tflite]
      [--int8 [--int8_calibration]] [--onnx] [--eval_subset N] [--latency_images N] [--debug]
  python -m tfquant.export --check OUT [--eval_npz TEST.npz] [--eval_subset N]

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
--check reads an export back: every .tflite/.onnx file against the size and SHA-256 export.json records, loaded
in its runtime, and with --eval_npz its accuracy; a damaged file is one error line.
"""
import sys
import time
import traceback
import zipfile

import numpy as np
import tensorflow as tf

from tfquant import export_command, files
from tfquant.errors import TfquantError
from tfquant.export import model_export, model_files, onnx_export, run_directory, tflite_export

NPZ_KEYS = ("x_test", "y_test")


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


def _check_export(args):
    """--check: read every model file of an export back (sizes, digests, formats, loaded in its runtime) and with
    --eval_npz print each one's accuracy; returns the exit status."""
    try:
        models = model_files.load_export(args.check)
        if not models:
            raise model_files.ModelFileError("export %s has no .tflite or .onnx file; expected an export made with "
                                             "--tflite, --int8 or --onnx" % args.check)
        test_data = _load_npz(args.eval_npz, args.eval_subset)[0] if args.eval_npz is not None else None
        lines = []
        for path, data in sorted(models.values()):
            # Each file is loaded (and with test data run) by its runtime from the path just verified.
            if model_files.kind_of(path) == "tflite":
                logits = tflite_export.run_tflite(path, test_data[0]) if test_data else None
                if logits is None:
                    tflite_export.make_interpreter(path)
            else:
                logits = onnx_export.run_onnx(path, test_data[0]) if test_data else None
                if logits is None:
                    onnx_export.single_image_runner(path)
            line = "%s: %d bytes, SHA-256 %s as recorded" % (path, len(data), model_files.digest(data))
            if logits is not None:
                line += ", accuracy %.4f on %d test images" % (
                    run_directory.accuracy(logits, test_data[1], "the file %s" % path), len(test_data[1]))
            lines.append(line)
    except USER_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write("error: %s\n" % run_directory.one_line(exc))
        return 2
    print("\n".join(lines))
    return 0


def main(argv=None):
    """Run the export; returns the exit status (0, or 2 after one 'error:' line on stderr)."""
    args = export_command.parse_args(sys.argv[1:] if argv is None else argv)
    # TensorFlow's deprecation notices for the TF1 freezing API are not the user's concern.
    tf.get_logger().setLevel("ERROR")
    if args.check is not None:
        return _check_export(args)
    start = time.time()
    try:
        test_data = calibration = None
        if args.eval_npz is not None:
            test_data, calibration = _load_npz(args.eval_npz, args.eval_subset)
        result = run_directory.export_run_directory(
            args.checkpoint_dir, args.output_dir, tflite=args.tflite, int8=args.int8,
            int8_calibration=args.int8_calibration, onnx=args.onnx, test_data=test_data,
            calibration_images=calibration,
            latency_images=run_directory.LATENCY_IMAGES if args.latency_images is None else args.latency_images,
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
