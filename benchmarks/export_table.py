"""Export table: file sizes and test accuracy of the float checkpoint, packed 8/4/2-bit models and TFLite.

Uses the checkpoints benchmarks.accuracy_table leaves in its --work_dir for one seed (its float checkpoint
and fine-tuned rows), exporting each with the real CLI (python -m tfquant.export).

  .venv/bin/python -m benchmarks.export_table          # after benchmarks.accuracy_table; writes BENCHMARKS.md
  .venv/bin/python -m benchmarks.export_table --quick --work_dir /tmp/acc_quick --output /tmp/export.json
"""
import argparse
import glob
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from benchmarks import accuracy_table, machine, publish

# (row of the accuracy table, what it stands for here, TFLite too)
EXPORTS = [("W8A8", "8-bit weights, 8-bit activations", True),
           ("W4A32 channel", "4-bit weights, channel buckets", False),
           ("W2A8 channel", "2-bit weights, channel buckets, 8-bit activations", False)]


def checkpoint_bytes(directory):
    """Bytes of the latest checkpoint's .index and .data files in `directory`."""
    prefix = tf.train.latest_checkpoint(directory)
    return sum(os.path.getsize(p) for p in glob.glob(prefix + ".*")), prefix


def write_test_npz(path, calibration_images=200):
    """The test set (x_test, y_test) as the ResNet helper preprocesses it, and x_train images for int8 calibration."""
    from learners.runner import dataset_arrays  # pylint: disable=import-outside-toplevel
    from nets.resnet_at_fmnist import ModelHelper  # pylint: disable=import-outside-toplevel
    helper = ModelHelper(resnet_size=20, batch_size=100, batch_size_eval=500, seed=0)
    x_test, y_test = dataset_arrays(helper, evaluation=True)
    x_train = dataset_arrays(helper, evaluation=False, limit=calibration_images)[0]
    np.savez(path, x_test=x_test, y_test=y_test, x_train=x_train)
    return path


def export_row(work_dir, seed, name, tflite, extra, npz):
    """Run the export CLI on one row's run directory; returns its export.json."""
    row_dir = accuracy_table.row_dir(work_dir, name, seed)
    out_dir = os.path.join(os.path.dirname(row_dir), "export_" + accuracy_table.slug(name))
    argv = [sys.executable, "-m", "tfquant.export", "--checkpoint_dir", row_dir, "--eval_npz", npz,
            "--output_dir", out_dir] + (["--int8"] if tflite else []) + extra
    result = subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError("export of %s failed:\n%s" % (name, result.stderr[-3000:]))
    return publish.load_json(os.path.join(out_dir, "export.json"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser, render_json=False)
    parser.add_argument("--work_dir", default="/tmp/tfquant_accuracy_table", help="accuracy_table's --work_dir")
    parser.add_argument("--seed", type=int, default=0, help="which seed's checkpoints to export")
    args = parser.parse_args(argv)
    load_before = publish.start(args)
    extra = ["--eval_subset=200", "--latency_images=20"] if args.quick else []
    exports = EXPORTS[:1] if args.quick else EXPORTS
    float_bytes, float_prefix = checkpoint_bytes(accuracy_table.float_dir(args.work_dir, args.seed))
    rows = []
    npz = write_test_npz(os.path.join(args.work_dir, "fmnist_test.npz"))
    for name, meaning, tflite in exports:
        data = export_row(args.work_dir, args.seed, name, tflite, extra, npz)
        rows.append({"name": name, "meaning": meaning, "export": data})
    payload = {"machine": machine.machine_info(), "load_before": load_before, "float_checkpoint_bytes": float_bytes,
               "float_checkpoint": float_prefix, "rows": rows, "quick": args.quick}
    publish.write_json(args.output, payload)
    if not args.quick:
        first = rows[0]["export"]
        float_model_bytes = first["packed"]["float_storage_bits"] / 8.0
        table = [("float checkpoint (`model.ckpt`: weights, batch-norm state, Momentum slots)", float_bytes,
                  "%.2f" % (100 * publish.load_json(os.path.join(accuracy_table.row_dir(
                      args.work_dir, rows[0]["name"], args.seed), "results.json"))["float_accuracy"]))]
        table.append(("float32 model, every stored variable once (the ratio's reference)", int(float_model_bytes),
                      "-"))
        for row in rows:
            data = row["export"]
            table.append(("packed `model.tfq`, %s" % row["meaning"], data["files"]["packed"]["bytes"],
                          "%.2f" % (100 * data["accuracy"]["frozen_graph"])))
        for label in ("float", "int8"):
            key = "tflite_" + label
            table.append(("TFLite %s (`model_%s.tflite`, from the W8A8 model)" % (label, label),
                          first["files"][key]["bytes"], "%.2f" % (100 * first["accuracy"][key])))
        latency = first["latency"]
        body = "\n".join([
            "## Export sizes and accuracy (ResNet-20, Fashion-MNIST, all 10,000 test images)", "",
            "Command: `%s` (after `benchmarks.accuracy_table`; exports with `python -m tfquant.export`)"
            % publish.command_line(), ""] + machine.machine_lines(payload["machine"], load_before) + [
            "- A packed model's accuracy is that of its frozen graph (weights decoded from the packed file); argmax "
            "agreement with the quantized checkpoint %.4f for W8A8."
            % first["frozen_vs_checkpoint"]["argmax_agreement"],
            "- int8 TFLite: activation ranges calibrated on %d training images." % first["int8"]["calibration_images"],
            "",
            publish.markdown_table(("file", "bytes", "test accuracy %"), table), "",
            "- TFLite latency per image (batch 1, one thread, alternating, medians): "
            "float %.3f ms, int8 %.3f ms; float/int8 = %.2f." % (
                latency["float"]["median_ms"], latency["int8"]["median_ms"], latency["float_over_int8_median"]),
            ""])
        publish.publish("export_table", body, args.markdown, load_before, payload["machine"]["load_average"],
                        args.allow_busy)
    for row in rows:
        data = row["export"]
        print("%-16s packed %8d bytes  accuracy %.4f" % (row["name"], data["files"]["packed"]["bytes"],
                                                          data["accuracy"]["frozen_graph"]))
    return 0


if __name__ == "__main__":
    publish.run_main(main)
