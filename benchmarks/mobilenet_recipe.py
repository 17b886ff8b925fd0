"""MobileNetV2 at W4A4 on Fashion-MNIST: the plain setting against the low-bit recipe, 3 seeds, through the real
run script (`python -m nets.mobilenet_at_fmnist_run`, the built-in MobileNetV2 with its 'small' stem).

Per seed: a float model trained to convergence (the script's 10-epoch cosine schedule), then from it, with the
same fine-tuning epochs and learning rate:
  - W4A4 plain: per-layer min/max weights, moving-average activation ranges;
  - W4A4 recipe: per-channel weights (a depthwise filter: one range per channel), LSQ steps for weights and
    activations with LSQ+ offsets where an activation can be negative, Adam for the ranges, oscillating weights
    frozen (Nagel et al. 2022), batch norms not folded while fine-tuning and re-estimated after it;
  - the same-budget float control (benchmarks.float_control): the fine-tuning with nothing quantized.
Both W4A4 rows quantize the same tensors: every ReLU6 output and, with --uql_quantize_layer_outputs, the linear
bottleneck outputs and residual sums the next block's expansion reads (first and last layers float).

  .venv/bin/python -m benchmarks.mobilenet_recipe --seeds 0,1,2          # the full run (hours; see run_all)
  .venv/bin/python -m benchmarks.mobilenet_recipe --quick --output /tmp/mr.json --work_dir /tmp/mr
"""
import argparse
import json
import os
import re
import subprocess
import sys

from benchmarks import accuracy_table, float_control, machine, publish, stats
from benchmarks.accuracy_table import parse_seeds, slug

SECTION = "mobilenet_recipe"
RUN_MODULE = "nets.mobilenet_at_fmnist_run"
# The image the first (float) convolution reads, the pooled features the float classifier reads and the logits
# (16 levels would tie classes) stay at 8 bits.
W4A4 = ("--uql_weight_bits=4 --uql_activation_bits=4 --uql_quantize_layer_outputs "
        "--uql_activation_overrides=.*:input=8,.*/Mean=8,.*/fc/MatMul:output=8")
PLAIN = "W4A4 plain"
RECIPE = "W4A4 recipe"
ROWS = {
    PLAIN: W4A4 + " --nouql_use_buckets --uql_weight_range=minmax --uql_act_range=ema",
    RECIPE: W4A4 + " --uql_use_buckets --uql_bucket_type=channel --uql_weight_range=lsq --uql_act_range=lsq"
                   " --uql_range_optimizer=adam --uql_freeze_oscillations=0.02 --nouql_fold_batch_norms"
                   " --uql_bn_reestimate_batches=20",
}
FULL = {"depth_mult": 1.0, "float": ["--nb_epochs_rat=1.0"], "epochs": 2.0, "finetune": ["--uql_lrn_rate_init=0.01"],
        "common": ["--batch_size=128", "--batch_size_eval=500", "--summ_step=100"]}
QUICK = {"depth_mult": 0.35, "float": ["--nb_epochs_rat=0.05"], "epochs": 0.25,
         "finetune": ["--uql_lrn_rate_init=0.01"],
         "common": ["--batch_size=32", "--batch_size_eval=100", "--summ_step=2", "--train_subset=128",
                    "--eval_subset=100", "--uql_analysis_batches=1"]}
TARGET_POINTS = 1.5
# The float learner's progress line (learners/training.py): "full-prec iter 200/4680 | loss 0.41 | acc 0.86 | ...",
# the loss and accuracy of that training batch.
PROGRESS = re.compile(r"^full-prec iter (\d+)/(\d+) \| loss ([0-9.]+) \| acc ([0-9.]+)", re.M)


def run_dir(work_dir, label, seed):
    """Where one (label, seed) run keeps its checkpoint, logs and results.json."""
    return os.path.join(work_dir, "seed%d" % seed, slug(label))


def run_flags(work_dir, label, row_flags, seed, budget):
    """The run-script flags of one fine-tuning (the seed's float checkpoint is trained first when missing)."""
    return (["--learner=uniform", "--save_path=%s" % os.path.join(work_dir, "seed%d" % seed, "float", "model.ckpt"),
             "--uql_save_quant_model_path=%s/model.ckpt" % run_dir(work_dir, label, seed),
             "--log_dir=%s/logs" % run_dir(work_dir, label, seed), "--seed=%d" % seed,
             "--mobilenet_version=2", "--mobilenet_depth_mult=%g" % budget["depth_mult"],
             "--uql_quant_epochs=%s" % budget["epochs"]] + budget["float"] + budget["finetune"] + budget["common"]
            + row_flags.split())


def float_curve(stdout):
    """[(step, nb_iters, training-batch loss, its accuracy)] of the float run's progress lines in a run's output."""
    return [(int(m.group(1)), int(m.group(2)), float(m.group(3)), float(m.group(4)))
            for m in PROGRESS.finditer(stdout)]


def depthwise_layers(report_path):
    """[(weight variable, range groups)] of the quantized depthwise layers of a run's quant_report.json."""
    with open(report_path) as handle:
        report = json.load(handle)
    return [(layer["weight_variable"], layer["num_groups"]) for layer in report["layers"]
            if layer.get("op_type") == "DepthwiseConv2dNative" and layer.get("status") == "quantized"]


def run_one(work_dir, label, row_flags, seed, budget):
    """One fine-tuning through the run script; its entry from the run's results.json and quant_report.json."""
    argv = [sys.executable, "-m", RUN_MODULE] + run_flags(work_dir, label, row_flags, seed, budget)
    seconds, done = stats.timed(lambda: subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True))
    publish.check_run(done, "%s seed %d" % (label, seed))
    results = publish.load_json(os.path.join(run_dir(work_dir, label, seed), "results.json"))
    entry = {"label": label, "seed": seed, "flags": row_flags, "argv": argv[3:], "epochs": budget["epochs"],
             "accuracy": results["quant_accuracy"], "float_accuracy": results["float_accuracy"],
             "test_examples": results["test_examples"], "seconds": seconds,
             "depthwise": depthwise_layers(results["report"]) if results.get("report") else [],
             "curve": float_curve(done.stdout)}
    if "oscillation" in results:
        entry["oscillation"] = results["oscillation"]
    return entry


def run_seed(work_dir, seed, budget):
    """The plain and recipe rows of a seed, each with the seed's same-budget float control."""
    entries = [run_one(work_dir, label, ROWS[label], seed, budget) for label in (PLAIN, RECIPE)]
    # Both rows fine-tune with the same epochs and rate: one control serves them.
    control_flags = float_control.control_flags(ROWS[RECIPE])
    assert control_flags == float_control.control_flags(ROWS[PLAIN])
    control = run_one(work_dir, float_control.control_label(ROWS[RECIPE], budget["epochs"]), " ".join(control_flags),
                      seed, budget)
    for entry in entries:
        entry["control_accuracy"] = control["accuracy"]
    # The float model was trained by the first run of the seed; its progress lines are in that run's output.
    return entries + [control], entries[0]["curve"]


def summarize(payload):
    """{label: mean/std of accuracy, mean change vs float and vs the control, seeds} for each row."""
    entries = payload["entries"]
    table = {}
    for label in [PLAIN, RECIPE]:
        mine = [e for e in entries if e["label"] == label]
        if not mine:
            continue
        mean, std = stats.mean_std(e["accuracy"] for e in mine)
        change, change_std = stats.mean_std(e["accuracy"] - e["float_accuracy"] for e in mine)
        control, _ = stats.mean_std(e["accuracy"] - e["control_accuracy"] for e in mine)
        table[label] = {"seeds": [e["seed"] for e in mine], "mean": mean, "std": std, "change": change,
                        "change_std": change_std, "vs_control": control}
    return table


def render(payload, command):
    """The BENCHMARKS.md section of a run's results."""
    entries, budget = payload["entries"], payload["budget"]
    floats = {e["seed"]: e["float_accuracy"] for e in entries}
    controls = [e for e in entries if e["label"] not in (PLAIN, RECIPE)]
    table = summarize(payload)
    rows = [("float (starting point)", ",".join(str(s) for s in sorted(floats)),
             accuracy_table.percent(*stats.mean_std(floats.values())), "-", "-")]
    if controls:
        rows.append(("float fine-tuned %g epochs (control)" % budget["epochs"],
                     ",".join(str(e["seed"]) for e in controls), accuracy_table.percent(*stats.mean_std(e["accuracy"] for e in controls)),
                     "%+.2f" % (100 * stats.mean_std(e["accuracy"] - e["float_accuracy"] for e in controls)[0]), "-"))
    rows += [(label, ",".join(str(s) for s in t["seeds"]), accuracy_table.percent(t["mean"], t["std"]), "%+.2f" % (100 * t["change"]),
              "%+.2f" % (100 * t["vs_control"])) for label, t in table.items()]
    recipe = [e for e in entries if e["label"] == RECIPE]
    lines = ["## MobileNetV2 W4A4 recipe (Fashion-MNIST, all 10,000 test images)", "",
             "Command: `%s`" % command, ""]
    lines += machine.machine_lines(payload["machine"], payload["load_before"])
    lines += ["- Model: the built-in MobileNetV2 (nets/mobilenet.py), depth multiplier %g, 'small' stem (first "
              "convolution and the 24-channel stage at stride 1: 28x28 ends at 4x4), 28x28x1 inputs." % budget["depth_mult"],
              "- Float: %s of the script's 10-epoch cosine schedule (rate 0.1, batch 128) per seed; every row "
              "fine-tunes that checkpoint for %g epochs with %s." % (" ".join(budget["float"]), budget["epochs"],
                                                                     " ".join(budget["finetune"])),
              "- %s: `%s`" % (PLAIN, ROWS[PLAIN]), "- %s: `%s`" % (RECIPE, ROWS[RECIPE])]
    if recipe:
        depthwise = recipe[0]["depthwise"]
        lines.append("- The recipe's %d depthwise layers have one range per channel (%s groups)."
                     % (len(depthwise), ", ".join(str(groups) for _, groups in depthwise)))
        frozen = [e["oscillation"]["frozen_fraction"] for e in recipe if "oscillation" in e]
        if frozen:
            lines.append("- Frozen oscillating weights at the end: %s %% (per seed)."
                         % ", ".join("%.2f" % (100 * f) for f in frozen))
    curves = payload.get("float_curves", {})
    if curves:
        lines.append("- Float training-batch accuracy at the last progress lines (seed: step/total accuracy): %s."
                     % "; ".join("%s: %s" % (seed, ", ".join("%d/%d %.3f" % (p[0], p[1], p[3]) for p in curve[-3:]))
                                 for seed, curve in sorted(curves.items()) if curve))
    lines += ["", publish.markdown_table(("row", "seeds", "test accuracy %", "vs float", "vs float fine-tuned"), rows),
              ""]
    lines += target_lines(table)
    return "\n".join(lines)


def target_lines(table):
    """The issue's target (the recipe within TARGET_POINTS of float over the seeds) and recipe vs plain."""
    lines = []
    if RECIPE in table:
        change = table[RECIPE]["change"]
        lines.append("- Target: MobileNetV2 W4A4 within %.1f points of its float (%d seeds): %s (%+.2f)."
                     % (TARGET_POINTS, len(table[RECIPE]["seeds"]),
                        "met" if change >= -TARGET_POINTS / 100 else "**not met**", 100 * change))
    if RECIPE in table and PLAIN in table:
        gain = table[RECIPE]["mean"] - table[PLAIN]["mean"]
        lines.append("- The recipe against plain W4A4: %+.2f points." % (100 * gain))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--work_dir", default="/tmp/tfquant_mobilenet_recipe", help="checkpoints and logs")
    parser.add_argument("--depth_mult", type=float, help="MobileNetV2's depth multiplier (default 1.0; --quick 0.35)")
    args = parser.parse_args(argv)
    if args.render_json:
        return publish.render_saved(args, SECTION, render)
    seeds = parse_seeds("0" if args.quick and args.seeds == "0,1,2" else args.seeds)
    budget = dict(QUICK if args.quick else FULL)
    if args.depth_mult is not None:
        if not args.depth_mult > 0:
            raise publish.BenchmarkError("--depth_mult=%s is not valid; expected a positive number" % args.depth_mult)
        budget["depth_mult"] = args.depth_mult
    load_before = publish.start(args)
    os.makedirs(args.work_dir, exist_ok=True)
    entries, curves = [], {}
    for seed in seeds:
        seed_entries, curves[str(seed)] = run_seed(args.work_dir, seed, budget)
        entries += seed_entries
        for entry in seed_entries:
            print("seed %d %-36s %.4f (float %.4f, %.0f s)" % (seed, entry["label"], entry["accuracy"],
                                                             entry["float_accuracy"], entry["seconds"]), flush=True)
    info = machine.machine_info(load=machine.end_load(args.quick or args.allow_busy))
    payload = {"quick": args.quick, "budget": budget, "machine": info, "load_before": load_before,
               "command": publish.command_line(), "entries": entries, "float_curves": curves}
    publish.save_and_publish(args, SECTION, payload, render)
    return payload


if __name__ == "__main__":
    publish.run_main(main)
