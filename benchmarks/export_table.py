"""Export table: file sizes and test accuracy of the float checkpoint, packed 8/4/2-bit models and TFLite.

Uses the checkpoints benchmarks.accuracy_table leaves in its --work_dir for one seed (its float checkpoint
and fine-tuned rows), exporting each with the real CLI (python -m tfquant.export).

  .venv/bin/python -m benchmarks.export_table          # after benchmarks.accuracy_table; writes BENCHMARKS.md
  .venv/bin/python -m benchmarks.export_table --quick --work_dir /tmp/acc_quick --output /tmp/export.json

With --kbit it builds issue 32's table instead (benchmarks.kbit_files: ResNet-20 W4A8 and W2A8, a MatMul-heavy
MLP with block buckets; every file's bytes, memory, latency at batch 1 and 32, agreement, accuracy):

  .venv/bin/python -m benchmarks.export_table --kbit     # trains what is missing; writes BENCHMARKS.md
  .venv/bin/python -m benchmarks.export_table --kbit --quick --work_dir /tmp/kbit_quick   # a tiny MLP only
"""
import argparse
import collections
import glob
import os
import subprocess
import sys
import typing

import numpy as np
import tensorflow as tf

from benchmarks import accuracy_table, kbit_files, machine, publish
from tfquant.export import divergence


class Export(typing.NamedTuple):
    """One export: the accuracy-table row whose checkpoint it exports, its label, what it is, CLI flags."""

    row: str
    label: str
    meaning: str
    flags: list


DEPLOYED_ROW = "W8A8 all layers deployable"
EXPORTS = [Export(DEPLOYED_ROW, "W8A8 deployable", "W8A8 every layer, symmetric weights, batch norm folded, every "
                  "tensor the int8 model holds trained (--uql_quantize_layer_outputs); integer files from the "
                  "trained ranges, no calibration", ["--int8", "--onnx"]),
           Export(DEPLOYED_ROW, "W8A8 deployable, calibrated int8", "the same checkpoint, int8 ranges by the "
                  "converter's calibration (the fallback)", ["--int8", "--int8_calibration"]),
           Export("W8A8 all layers symmetric folded", "W8A8 symmetric folded", "the same without "
                  "--uql_quantize_layer_outputs: the input, the outputs before residual adds and the logits "
                  "calibrated on 200 training images at export", ["--int8", "--onnx"]),
           Export("W4A8 ch", "W4A8 channel", "4-bit weights, channel buckets, 8-bit activations", [])]
QUICK_EXPORTS = [Export("W8A8", "W8A8", "8-bit weights, 8-bit activations", ["--int8"])]
DEPLOYED = "W8A8 deployable"
# Issue 13's targets for the model trained as deployed.
AGREEMENT_TARGET = 0.997
ACCURACY_TARGET_POINTS = 0.1
LATENCY_TARGET = 0.35


def checkpoint_bytes(directory):
    """Bytes of the latest checkpoint's .index and .data files in `directory`."""
    prefix = tf.train.latest_checkpoint(directory)
    return sum(os.path.getsize(p) for p in glob.glob(prefix + ".*")), prefix


def write_test_npz(path, calibration_images=200):
    """The test set (x_test, y_test) as the ResNet helper preprocesses it, and x_train images for the ranges
    training did not record (int8 and ONNX export)."""
    from learners.runner import dataset_arrays  # pylint: disable=import-outside-toplevel
    from nets.resnet_at_fmnist import ModelHelper  # pylint: disable=import-outside-toplevel
    helper = ModelHelper(resnet_size=20, batch_size=100, batch_size_eval=500, seed=0)
    x_test, y_test = dataset_arrays(helper, evaluation=True)
    x_train = dataset_arrays(helper, evaluation=False, limit=calibration_images)[0]
    np.savez(path, x_test=x_test, y_test=y_test, x_train=x_train)
    return path


def export_row(work_dir, seed, export, extra, npz):
    """Run the export CLI on one row's run directory; returns its export.json."""
    row_dir = accuracy_table.row_dir(work_dir, export.row, seed)
    out_dir = os.path.join(os.path.dirname(row_dir), "export_" + accuracy_table.slug(export.label))
    argv = [sys.executable, "-m", "tfquant.export", "--checkpoint_dir", row_dir, "--eval_npz", npz,
            "--output_dir", out_dir] + export.flags + extra
    result = subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True)
    publish.check_run(result, "export of %s" % export.label)
    return publish.load_json(os.path.join(out_dir, "export.json"))


# Exported files besides the packed one: export.json key, what the table calls it, latency key.
DEPLOYABLE = (("tflite_float", "TFLite float (`model_float.tflite`)", "float"),
              ("tflite_float", "the same, built-in kernels (no XNNPACK)", "float_builtin_kernels"),
              ("tflite_int8", "TFLite int8 (`model_int8.tflite`)", "int8"),
              ("onnx", "ONNX Q/DQ (`model.onnx`)", "onnx"))


def deployed_targets(data):
    """(what, value, limit, met) of issue 13's targets for one export.json of the deployed row."""
    reference = data["accuracy"]["quantized_checkpoint"]
    checks = []
    for key in ("tflite_int8", "onnx"):
        if key in data["agreement_with_quantized_tf"]:
            agreement = data["agreement_with_quantized_tf"][key]
            points = abs(100 * (data["accuracy"][key] - reference))
            checks.append(("%s agreement with the quantized TF graph >= %.3f" % (key, AGREEMENT_TARGET),
                           agreement, AGREEMENT_TARGET, agreement >= AGREEMENT_TARGET))
            checks.append(("%s accuracy within %.1f point of the quantized TF graph" % (key, ACCURACY_TARGET_POINTS),
                           points, ACCURACY_TARGET_POINTS, points <= ACCURACY_TARGET_POINTS))
    latency = data.get("latency", {})
    if "int8_over_float_median" in latency:
        ratio = latency["int8_over_float_median"]
        checks.append(("int8 TFLite latency <= %.2fx float TFLite" % LATENCY_TARGET, ratio, LATENCY_TARGET,
                       ratio <= LATENCY_TARGET))
    if "int8_over_float_builtin_median" in latency:
        ratio = latency["int8_over_float_builtin_median"]
        checks.append(("(context) int8 TFLite latency <= %.2fx float TFLite on the built-in kernels"
                       % LATENCY_TARGET, ratio, LATENCY_TARGET, ratio <= LATENCY_TARGET))
    return checks


def agreement_cell(data, key):
    """'0.9964 (36 differ, 15 tied)': a file's agreement and how many disagreeing images are top-logit ties."""
    agreement = data.get("agreement_with_quantized_tf", {})
    if key not in agreement:
        return "-"
    differ = data.get("disagreements_with_quantized_tf", {}).get(key)
    if not differ or not differ["images"]:
        return "%.4f" % agreement[key]
    return "%.4f (%d differ, %d tied)" % (agreement[key], differ["images"], differ["tied"])


def divergence_note(name, layer_divergence):
    """One line: how the int8 file's codes depart from the TF graph's, first operator to output."""
    layers = [r for r in layer_divergence["layers"] if r["differ"] is not None and r["op"] != divergence.INPUT]
    if not layers:
        return "- %s, int8 codes against the TF graph: no tensor compared." % name
    middle = layers[len(layers) // 2]
    return ("- %s, int8 TFLite (%s kernels) against the TF graph on %d test images, share of int8 codes that "
            "differ: first operator (%s) %.2f %%, middle (%s, %s) %.2f %%, output %.2f %%; at most %d steps."
            % (name, layer_divergence["kernels"].split(" ")[0], layer_divergence["images"], layers[0]["op"],
               100 * layers[0]["differ"], middle["op"], middle["tensor"], 100 * middle["differ"],
               100 * layers[-1]["differ"], max(r["max_steps"] for r in layers)))


def render(payload, float_accuracy, command):
    """The BENCHMARKS.md section: sizes, accuracy and agreement of every file, latency, the targets."""
    rows = payload["rows"]
    first = rows[0]["export"]
    table = [("float checkpoint (`model.ckpt`: weights, batch-norm state, Momentum slots)", "-",
              payload["float_checkpoint_bytes"], "%.2f" % (100 * float_accuracy), "-", "-")]
    table.append(("float32 model, every stored variable once (the ratio's reference)", "-",
                  int(first["packed"]["float_storage_bits"] / 8.0), "-", "-", "-"))
    notes = ["- `%s`: %s (the accuracy table's `%s` checkpoint)." % (row["name"], row["meaning"], row["row"])
             for row in rows]
    for row in rows:
        data = row["export"]
        latency = data.get("latency", {})
        table.append(("packed `model.tfq`", row["name"], data["files"]["packed"]["bytes"],
                      "%.2f" % (100 * data["accuracy"]["frozen_graph"]),
                      "%.4f" % data["frozen_vs_checkpoint"]["argmax_agreement"], "-"))
        for key, label, timing in DEPLOYABLE:
            # The built-in-kernel line is a second timing of the float file, shown only where it was timed.
            if key in data["files"] and (timing != "float_builtin_kernels" or timing in latency):
                table.append((label, row["name"], data["files"][key]["bytes"], "%.2f" % (100 * data["accuracy"][key]),
                              agreement_cell(data, key),
                              "%.3f" % latency[timing]["median_ms"] if timing in latency else "-"))
        if "int8" in data:
            notes.append("- %s, int8 activation ranges: %s (%d calibration images)." % (
                row["name"], data["int8"]["activation_ranges"], data["int8"]["calibration_images"]))
        if "int8_layer_divergence" in data:
            notes.append(divergence_note(row["name"], data["int8_layer_divergence"]))
        if "trained_ranges" in data:
            ranges = data["trained_ranges"]
            kinds = collections.Counter(w["int8"] for w in ranges["weights"])
            reasons = sorted({w["reason"] for w in ranges["weights"] if w["int8"] != "exact"})
            notes.append("- %s, integer files: weights of %d layers on exactly the trained grid, %d re-gridded to "
                         "int8%s; activation ranges %s." % (
                             row["name"], kinds["exact"], sum(kinds.values()) - kinds["exact"],
                             " (%s)" % "; ".join(reasons) if reasons else "",
                             ", ".join("%d %s" % (n, k) for k, n in sorted(ranges["activation_ranges"].items()))))
    ties = [row["export"]["disagreements_with_quantized_tf"]["frozen_graph"]["reference_ties"] for row in rows
            if row["name"] == DEPLOYED and "disagreements_with_quantized_tf" in row["export"]]
    lines = ["## Export sizes, accuracy and agreement (ResNet-20, Fashion-MNIST, all 10,000 test images)", "",
             "Command: `%s` (after `benchmarks.accuracy_table`; exports with `python -m tfquant.export`)" % command,
             ""] + machine.machine_lines(payload["machine"], payload["load_before"]) + [
        "- Agreement: the share of test images given the class the quantized TF graph (the checkpoint) gives. A "
        "packed model's accuracy is that of its frozen graph (weights decoded from the packed file). Latency: "
        "batch 1, one thread, files run alternately, median ms per image. Tied: disagreeing images whose two "
        "largest logits are equal in the checkpoint or in the file (quantized logits sit on a grid, so such an "
        "image's class is set by the order of the classes and one rounding step anywhere can change it)%s." % (
            "; %d of the test images tie in `%s`'s checkpoint" % (ties[0], DEPLOYED) if ties else ""),
        ""] + notes + [
        "", publish.markdown_table(("file", "model", "bytes", "test accuracy %", "agreement", "latency ms"), table)]
    deployed = [row["export"] for row in rows if row["name"] == DEPLOYED]
    if deployed:
        lines += ["", "Targets (issue 13) for `%s`:" % DEPLOYED, "", publish.markdown_table(
            ("target", "measured", "limit", "met"),
            [(what, "%.4f" % value, "%.3f" % limit, "yes" if met else "**no**")
             for what, value, limit, met in deployed_targets(deployed[0])])]
    return "\n".join(lines + [""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser, render_json=False)
    parser.add_argument("--work_dir", default="/tmp/tfquant_accuracy_table", help="accuracy_table's --work_dir")
    parser.add_argument("--seed", type=int, default=0, help="which seed's checkpoints to export")
    parser.add_argument("--kbit", action="store_true", help="issue 32's k-bit files table instead")
    args = parser.parse_args(argv)
    load_before = publish.start(args)
    if args.kbit:
        return _kbit(args, load_before)
    extra = ["--eval_subset=200", "--latency_images=20"] if args.quick else []
    exports = QUICK_EXPORTS if args.quick else EXPORTS
    float_bytes, float_prefix = checkpoint_bytes(accuracy_table.float_dir(args.work_dir, args.seed))
    rows = []
    npz = write_test_npz(os.path.join(args.work_dir, "fmnist_test.npz"))
    for export in exports:
        data = export_row(args.work_dir, args.seed, export, extra, npz)
        rows.append({"name": export.label, "row": export.row, "meaning": export.meaning, "export": data})
    end_info = machine.machine_info(load=machine.end_load(args.quick))
    payload = {"machine": end_info, "load_before": load_before, "float_checkpoint_bytes": float_bytes,
               "float_checkpoint": float_prefix, "rows": rows, "quick": args.quick}
    publish.write_json(publish.results_path(args, "export_table"), payload)
    if not args.quick:
        float_accuracy = publish.load_json(os.path.join(accuracy_table.row_dir(
            args.work_dir, rows[0]["row"], args.seed), "results.json"))["float_accuracy"]
        publish.publish("export_table", render(payload, float_accuracy, publish.command_line()), args.markdown,
                        load_before, payload["machine"]["load_average"], args.allow_busy)
    for row in rows:
        data = row["export"]
        print("%-16s packed %8d bytes  accuracy %.4f" % (row["name"], data["files"]["packed"]["bytes"],
                                                          data["accuracy"]["frozen_graph"]))
    return 0


def _kbit(args, load_before):
    """The k-bit files table (benchmarks.kbit_files): run, write the JSON, publish unless --quick."""
    payload = kbit_files.run(args.work_dir, args.quick, args.seed)
    payload.update(machine=machine.machine_info(load=machine.end_load(args.quick)), load_before=load_before,
                   command=publish.command_line())
    publish.write_json(publish.results_path(args, "export_kbit"), payload)
    if not args.quick:
        body = kbit_files.render(payload, payload["command"], machine.machine_lines(payload["machine"], load_before))
        publish.publish("export_kbit", body, args.markdown, load_before, payload["machine"]["load_average"],
                        args.allow_busy)
    for row in payload["rows"]:
        print("%-24s %-14s %9d bytes  %.2fx accounted  %7.1f MB added  b1 %.3f ms" % (
            row["model"], row["file"], row["bytes"], row["over_accounted"], row["rss_added_kb"] / 1024.0,
            row["latency_ms"]["b1_t1"]))
    return 0


if __name__ == "__main__":
    publish.run_main(main)
