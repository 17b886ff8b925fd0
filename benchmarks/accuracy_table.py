"""Accuracy table: ResNet-20 on the full Fashion-MNIST test set, every row fine-tuned from ONE float checkpoint.

Each row is a real run of nets/resnet_at_fmnist_run.py --learner uniform (what users run), with the same
fine-tuning budget (epochs, learning rate, seed); the float checkpoint is trained once by the first row.

  .venv/bin/python benchmarks/accuracy_table.py              # full: writes its section of BENCHMARKS.md
  .venv/bin/python benchmarks/accuracy_table.py --quick --output /tmp/acc.json
"""
import argparse
import json
import os
import subprocess
import sys

from benchmarks import common  # noqa: E402

RUN_SCRIPT = os.path.join(publish.REPO_ROOT, "nets", "resnet_at_fmnist_run.py")
# (row name, flags); the baseline row reproduces PocketFlow's behaviour: batch ranges everywhere, no buckets.
ROWS = [
    ("W8A8", ["--uql_weight_bits=8", "--uql_activation_bits=8"]),
    ("W4A4", ["--uql_weight_bits=4", "--uql_activation_bits=4"]),
    ("W4A32 channel", ["--uql_weight_bits=4", "--uql_activation_bits=32", "--uql_use_buckets",
                       "--uql_bucket_type=channel"]),
    ("W2A8 channel", ["--uql_weight_bits=2", "--uql_activation_bits=8", "--uql_use_buckets",
                      "--uql_bucket_type=channel"]),
    ("W2A8 split/128", ["--uql_weight_bits=2", "--uql_activation_bits=8", "--uql_use_buckets",
                        "--uql_bucket_type=split", "--uql_bucket_size=128"]),
    ("W4A4 PocketFlow behaviour (baseline)", ["--uql_weight_bits=4", "--uql_activation_bits=4",
                                              "--uql_act_range=batch"]),
]
FULL = {"float": ["--nb_epochs_rat=1.0"], "finetune": ["--uql_quant_epochs=1.0", "--uql_lrn_rate_init=0.01"],
        "common": ["--seed=0", "--batch_size=128", "--batch_size_eval=500", "--summ_step=100"]}
QUICK = {"float": ["--nb_epochs_rat=0.02"], "finetune": ["--uql_quant_epochs=0.25", "--uql_lrn_rate_init=0.01"],
         "common": ["--seed=0", "--batch_size=32", "--batch_size_eval=100", "--summ_step=4",
                    "--train_subset=256", "--eval_subset=200"]}


def run_row(work_dir, name, row_flags, budget):
    """Run one uniform fine-tuning from the shared float checkpoint; returns its results.json."""
    slug = "".join(c if c.isalnum() else "_" for c in name)
    out_dir = os.path.join(work_dir, slug)
    argv = [sys.executable, RUN_SCRIPT, "--learner=uniform", "--save_path=%s/float/model.ckpt" % work_dir,
            "--uql_save_quant_model_path=%s/model.ckpt" % out_dir, "--log_dir=%s/logs" % out_dir]
    argv += budget["float"] + budget["finetune"] + budget["common"] + row_flags
    env = dict(os.environ, PYTHONPATH=publish.REPO_ROOT)
    seconds, result = stats.timed(lambda: subprocess.run(argv, cwd=work_dir, env=env, capture_output=True,
                                                          text=True))
    if result.returncode != 0:
        raise RuntimeError("row %s failed:\n%s" % (name, result.stderr[-3000:]))
    with open(os.path.join(out_dir, "results.json")) as handle:
        results = json.load(handle)
    results["seconds"] = seconds
    results["flags"] = row_flags
    return results


def target_lines(float_accuracy, rows):
    """The issue's targets, checked against the measured rows."""
    by_name = {row["name"]: row["accuracy"] for row in rows}
    baseline = by_name["W4A4 PocketFlow behaviour (baseline)"]
    checks = [
        ("W4A4 within 0.5 points of float", float_accuracy - by_name["W4A4"] <= 0.005,
         "%+.2f" % (100 * (by_name["W4A4"] - float_accuracy))),
        ("W2 channel within 2 points of float", float_accuracy - by_name["W2A8 channel"] <= 0.02,
         "%+.2f" % (100 * (by_name["W2A8 channel"] - float_accuracy))),
        ("tfquant W4A4 at or above the PocketFlow-behaviour row", by_name["W4A4"] >= baseline,
         "%.2f vs %.2f" % (100 * by_name["W4A4"], 100 * baseline)),
    ]
    return ["- Target: %s: %s (%s)." % (what, "met" if ok else "**not met**", value) for what, ok, value in checks]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to keep the script working (tests)")
    parser.add_argument("--work_dir", default="/tmp/tfquant_accuracy_table", help="checkpoints and logs")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    os.makedirs(args.work_dir, exist_ok=True)
    info = machine.machine_info()
    rows = []
    # --quick keeps the script working in the test suite: the first row and the baseline are enough.
    for name, flags in (ROWS[:1] + ROWS[-1:] if args.quick else ROWS):
        results = run_row(args.work_dir, name, flags, budget)
        rows.append({"name": name, "accuracy": results["quant_accuracy"], "ratio": results["compression_ratio"],
                     "float_accuracy": results["float_accuracy"], "seconds": results["seconds"],
                     "test_examples": results["test_examples"], "flags": flags})
    float_accuracy = rows[0]["float_accuracy"]
    if any(abs(row["float_accuracy"] - float_accuracy) > 1e-9 for row in rows):
        raise RuntimeError("rows did not start from the same float checkpoint")
    payload = {"machine": info, "float_accuracy": float_accuracy, "rows": rows,
               "budget": budget, "quick": args.quick}
    publish.write_json(args.output, payload)
    if not args.quick:
        table = [("float (starting point)", "%.2f" % (100 * float_accuracy), "-", "1.00x")]
        table += [(row["name"], "%.2f" % (100 * row["accuracy"]),
                   "%+.2f" % (100 * (row["accuracy"] - float_accuracy)), "%.2fx" % row["ratio"]) for row in rows]
        body = "\n".join([
            "## Accuracy table (ResNet-20, Fashion-MNIST, all 10,000 test images)", "",
            "Command: `%s`" % publish.command_line(), ""] + machine.machine_lines(info) + [
            "- Float recipe: 3 epochs (1,407 iterations, batch 128), Momentum 0.9, cosine learning rate from 0.1 with "
            "2% warm-up, weight decay 2e-4, seed 0 (`--nb_epochs_rat=1.0`); trained by the first row unless "
            "`<work_dir>/float` already holds it.",
            "- Every row: %s fine-tuning from that one checkpoint: %s." % (
                "the same", " ".join(budget["finetune"] + budget["common"])),
            "- First and last layers float (default); the compression ratio counts every stored bit.", "",
            publish.markdown_table(("row", "test accuracy %", "vs float", "model compression"), table), ""]
            + target_lines(float_accuracy, rows))
        publish.write_section("accuracy_table", body)
    for row in rows:
        print("%-40s %.4f  (%.0f s)" % (row["name"], row["accuracy"], row["seconds"]))
    print("float: %.4f; total %.0f s" % (float_accuracy, sum(r["seconds"] for r in rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
