"""The parts of `python -m tfquant.export` that need no TensorFlow: its arguments, and the run directory's lock
taken before TensorFlow is imported.

`python -m tfquant.export` imports the tfquant package (and with it TensorFlow, seconds) before the command's own
code runs. The package's first lines call hold_checkpoint_dir_early(), so a second process on a held run
directory is refused in a fraction of a second, and a malformed command line is refused before the import too
(by the same parser the command uses). The lock is tfquant.files.lock_directory's, so the export's own lock of
the directory later finds it held and takes nothing twice.
"""
import argparse
import os
import sys

from tfquant import files

MODULE = "tfquant.export"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, as for every other bad input, instead of argparse's usage block.
        sys.stderr.write("error: %s\n" % message)
        sys.exit(2)


def parse_args(argv):
    """The command's arguments (argparse.Namespace); a bad one ends the process with one 'error:' line (status 2).

    Args:
      argv: the arguments after the command name.
    """
    parser = _Parser(prog="python -m tfquant.export",
                     description="Export a quantized run directory to a packed .tfq file, a frozen graph, TFLite "
                                 "and ONNX models.")
    parser.add_argument("--checkpoint_dir", help="directory with quant_report.json, inference_graph.meta and "
                        "model.ckpt-N")
    parser.add_argument("--output_dir")
    parser.add_argument("--check", metavar="EXPORT_DIR", default=None,
                        help="instead of exporting, read an export back: every .tflite/.onnx file checked against "
                        "the size and SHA-256 its export.json records and loaded in its runtime (with --eval_npz, "
                        "each file's accuracy)")
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
    parser.add_argument("--latency_images", type=int, default=None,
                        help="test images per model for the latency measurement (default: 100)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.check is not None:
        given = [name for name in ("checkpoint_dir", "output_dir") if getattr(args, name) is not None]
        given += [name for name in ("tflite", "int8", "int8_calibration", "onnx") if getattr(args, name)]
        if given:
            parser.error("--%s is not valid with --check; expected --check alone, or with --eval_npz / "
                         "--eval_subset" % given[0])
    else:
        missing = [name for name in ("checkpoint_dir", "output_dir") if getattr(args, name) is None]
        if missing:
            parser.error("the following arguments are required: %s" % ", ".join("--" + m for m in missing))
    for name, minimum in (("eval_subset", 1), ("latency_images", 0)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error("--%s=%d is not valid; expected an integer >= %d" % (name, value, minimum))
    if args.int8_calibration and not args.int8:
        parser.error("--int8_calibration is only valid with --int8")
    return args


def in_use_message(checkpoint_dir, pid, directory=None):
    """The one line (without 'error: ') an export refused by a held run directory gives."""
    holder = "process %d" % pid if pid else "another process"
    return ("checkpoint_dir=%s is in use by %s (lock %s); expected one process per run directory: wait for it to "
            "end" % (checkpoint_dir, holder, os.path.join(directory or checkpoint_dir, files.LOCK_NAME)))


def _module_being_run():
    """The module name of `python -m NAME` while Python is still locating it (sys.argv[0] is '-m'), else None."""
    original = getattr(sys, "orig_argv", None)
    if sys.argv[:1] != ["-m"] or not original or len(original) <= len(sys.argv):
        return None
    token = original[-len(sys.argv)]  # the script's arguments follow the module name
    return token[2:] if token.startswith("-m") else token


def hold_checkpoint_dir_early():
    """When this process is `python -m tfquant.export`: parse its arguments and lock --checkpoint_dir (when it is a
    directory), ending the process with one 'error:' line (status 2) when another process holds it."""
    if _module_being_run() not in (MODULE, MODULE + ".__main__"):
        return
    args = parse_args(sys.argv[1:])
    if args.checkpoint_dir is None or not os.path.isdir(args.checkpoint_dir):
        return  # the export says what is wrong with it
    try:
        files.lock_directory(args.checkpoint_dir)
    except files.DirectoryInUse as exc:
        sys.stderr.write("error: %s\n" % in_use_message(args.checkpoint_dir, exc.pid, exc.directory))
        sys.exit(2)
    except OSError:
        pass  # the export's own lock names the cause
