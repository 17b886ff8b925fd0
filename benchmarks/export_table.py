"""Export table: file sizes and test accuracy of the float checkpoint, packed 8/4/2-bit models and TFLite.

Uses the checkpoints benchmarks/accuracy_table.py leaves in its --work_dir (one float checkpoint and the
fine-tuned rows), exporting each with the real CLI (python -m tfquant.export).

  .venv/bin/python benchmarks/export_table.py                  # after accuracy_table.py; writes BENCHMARKS.md
  .venv/bin/python benchmarks/export_table.py --quick --work_dir /tmp/acc_quick --output /tmp/export.json
"""
import argparse
import glob
import json
import os
import subprocess
import sys

from benchmarks import common  # noqa: E402

# (row of the accuracy table, what it stands for here, TFLite too)
EXPORTS = [("W8A8", "8-bit weights, 8-bit activations", True),
           ("W4A32 channel", "4-bit weights, channel buckets", False),
           ("W2A8 channel", "2-bit weights, channel buckets, 8-bit activations", False)]


def _slug(name):
    return "".join(c if c.isalnum() else "_" for c in name)


def checkpoint_bytes(directory):
    """Bytes of the latest checkpoint's .index and .data files in `directory`."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    prefix = tf.train.latest_checkpoint(directory)
    return sum(os.path.getsize(p) for p in glob.glob(prefix + ".*")), prefix


def export_row(work_dir, name, tflite, extra):
    """Run the export CLI on one row's checkpoint; returns its export.json."""
    out_dir = os.path.join(work_dir, "export_" + _slug(name))
    argv = [sys.executable, "-m", "tfquant.export", "--checkpoint_dir", os.path.join(work_dir, _slug(name)),
            "--model", "resnet_at_fmnist", "--output_dir", out_dir] + (["--int8"] if tflite else []) + extra
    result = subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=publish.REPO_ROOT))
    if result.returncode != 0:
        raise RuntimeError("export of %s failed:\n%s" % (name, result.stderr[-3000:]))
    with open(os.path.join(out_dir, "export.json")) as handle:
        return json.load(handle)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the first row, on few images (tests)")
    parser.add_argument("--work_dir", default="/tmp/tfquant_accuracy_table", help="accuracy_table.py's --work_dir")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    extra = ["--eval_subset=200", "--latency_images=20"] if args.quick else []
    exports = EXPORTS[:1] if args.quick else EXPORTS
    float_bytes, float_prefix = checkpoint_bytes(os.path.join(args.work_dir, "float"))
    rows = []
    for name, meaning, tflite in exports:
        data = export_row(args.work_dir, name, tflite, extra)
        rows.append({"name": name, "meaning": meaning, "export": data})
    payload = {"machine": machine.machine_info(), "float_checkpoint_bytes": float_bytes,
               "float_checkpoint": float_prefix, "rows": rows}
    publish.write_json(args.output, payload)
    if not args.quick:
        first = rows[0]["export"]
        float_model_bytes = first["packed"]["float_storage_bits"] / 8.0
        table = [("float checkpoint (`model.ckpt`: weights, batch-norm state, Momentum slots)", float_bytes,
                  "%.2f" % (100 * json.load(open(os.path.join(args.work_dir, _slug(rows[0]["name"]),
                                                              "results.json")))["float_accuracy"]))]
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
            "Command: `%s` (after `benchmarks/accuracy_table.py`, whose checkpoints it exports with "
            "`python -m tfquant.export`)" % publish.command_line(), ""] + machine.machine_lines(payload["machine"]) + [
            "- Accuracy of a packed model = its frozen inference graph (weights decoded from the packed file); "
            "it predicts exactly as the quantized checkpoint (argmax agreement %.4f for W8A8)."
            % first["frozen_vs_checkpoint"]["argmax_agreement"],
            "- int8 TFLite: weights and activations int8, activation ranges calibrated by the converter on %d "
            "training images." % first["int8"]["calibration_images"], "",
            publish.markdown_table(("file", "bytes", "test accuracy %"), table), "",
            "- TFLite latency per image (batch 1, one thread, models alternating image by image, medians): "
            "float %.3f ms, int8 %.3f ms; float/int8 = %.2f." % (
                latency["float"]["median_ms"], latency["int8"]["median_ms"], latency["float_over_int8_median"]),
            ""])
        publish.write_section("export_table", body)
    for row in rows:
        data = row["export"]
        print("%-16s packed %8d bytes  accuracy %.4f" % (row["name"], data["files"]["packed"]["bytes"],
                                                          data["accuracy"]["frozen_graph"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
