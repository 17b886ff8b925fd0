"""Transformer on Fashion-MNIST (issue 35): W8A8 and W4A8 against the float model they start from, over seeds 0-2,
through the real run script (`python -m nets.transformer_at_fmnist_run`, patches as tokens).

Per seed, the float Transformer comes from benchmarks.baselines' `converge`: the script's default schedule (20
epochs, cosine with warm-up, rate 0.1) at the lengths --ratios names (doubling), stopping at the first whose next
doubling adds less than 0.1 point; the models stay cached in --cache_dir with their settings and commands, so a
longer --ratios later reuses them. From the chosen length's checkpoint every row fine-tunes with the same epochs and
rate (benchmarks.accuracy_table.run_row), each beside its same-budget float control (accuracy_table.run_control:
the same fine-tuning, nothing quantized).

Rows: every MatMul / BatchMatMulV2 weight but the token embedding and the classifier (first and last layers float,
tfquant's default) with one range per output channel, and 8-bit activations on every tensor
--uql_quantize_layer_outputs covers (the model input, each projection's output, each residual sum): the model has
no ReLU-family op, so without it "A8" would quantize nothing. Layer norm, softmax and GELU compute in float.

  .venv/bin/python -m benchmarks.transformer_accuracy                     # 3 seeds, the 20-epoch schedule (~1 h)
  .venv/bin/python -m benchmarks.transformer_accuracy --ratios 1,2,4      # doubling until converged (hours)
  .venv/bin/python -m benchmarks.transformer_accuracy --quick --output /tmp/ta.json --work_dir /tmp/ta
"""
import argparse
import os

from benchmarks import accuracy_table, accuracy_targets, baselines, machine, publish, stats

SECTION = "transformer_accuracy"
RUN_MODULE = "nets.transformer_at_fmnist_run"
BASE_EPOCHS = 20  # nets.transformer_at_fmnist.ModelHelper.base_epochs: what --nb_epochs_rat=1 trains
CH = "--uql_use_buckets --uql_bucket_type=channel --uql_quantize_layer_outputs --uql_activation_bits=8"
ROWS = [accuracy_table.Row(label, CH + " --uql_weight_bits=%d" % bits) for label, bits in (("W8A8 ch", 8),
                                                                                          ("W4A8 ch", 4))]
# Float schedule lengths tried (ratios of the 20 epochs) and the fine-tuning; a mode's runs share its common flags.
# The full run's default is the script's own schedule only, to fit about an hour on the 2-core machine (a float
# epoch is about 46 CPU-seconds): doubling it (--ratios 1,2,4) takes 3-6 hours. The quick mode trains one tiny
# length (benchmarks.baselines' own test covers the doubling).
FULL_COMMON = ["--batch_size=128", "--batch_size_eval=500", "--summ_step=100"]
QUICK_COMMON = ["--batch_size=32", "--batch_size_eval=100", "--summ_step=4", "--train_subset=256",
                "--eval_subset=200", "--uql_analysis_batches=1"]
FULL = {"ratios": [1.0], "epochs": 1.0, "finetune": ["--uql_lrn_rate_init=0.01"], "common": FULL_COMMON}
QUICK = {"ratios": [0.025], "epochs": 0.25, "finetune": ["--uql_lrn_rate_init=0.01"], "common": QUICK_COMMON}


def baseline_budget(mode, ratios):
    """benchmarks.baselines' budget of the float Transformer: this module's run script and schedule."""
    return {"module": RUN_MODULE, "base_epochs": BASE_EPOCHS, "ratios": list(ratios), "common": list(mode["common"])}


def finetune_budget(mode, epochs, cache_dir):
    """accuracy_table's budget of the rows: fine-tuning the float models cached in cache_dir."""
    budget = {"module": RUN_MODULE, "float": [], "epochs": epochs, "finetune": list(mode["finetune"]),
              "common": list(mode["common"])}
    return accuracy_table.with_baselines(budget, cache_dir)


def parse_ratios(spec):
    """Increasing positive schedule ratios from a comma-separated list such as 1,2,4."""
    try:
        ratios = [float(part) for part in spec.split(",")]
    except ValueError:
        ratios = None
    if not ratios or any(r <= 0 for r in ratios) or ratios != sorted(set(ratios)):
        raise publish.BenchmarkError("--ratios=%s is not valid; expected increasing positive ratios of the %d-epoch "
                                     "schedule such as 1,2,4" % (spec, BASE_EPOCHS))
    return ratios


def run_seed(work_dir, seed, budget, controls):
    """The rows of one seed, each with its control's label and accuracy (`controls` caches the control runs)."""
    entries = []
    for row in ROWS:
        entry = accuracy_table.run_row(work_dir, row, seed, budget)
        entry["control_label"], entry["control_accuracy"] = accuracy_table.run_control(work_dir, row, seed, budget,
                                                                                      controls)
        print("seed %d %-8s %.4f (float %.4f, float fine-tuned %.4f, %.0f s)"
              % (seed, row.label, entry["accuracy"], entry["float_accuracy"], entry["control_accuracy"],
                 entry["seconds"]), flush=True)
        entries.append(entry)
    return entries


def summarize(payload):
    """The figures the section shows, computed from the entries: the float model per seed, each row's mean and its
    mean gaps against float and control (accuracy_table.summarize), each control's mean, and the targets judged."""
    entries = payload["entries"]
    floats = {e["seed"]: e["float_accuracy"] for e in entries}
    rows = accuracy_table.summarize(entries)
    controls = {}
    for control in payload["controls"]:
        controls.setdefault(control["label"], []).append(control)
    control_means = {label: (stats.mean_std(c["accuracy"] for c in mine),
                             stats.mean_std(c["accuracy"] - c["float_accuracy"] for c in mine)[0])
                     for label, mine in controls.items()}
    checks = accuracy_targets.transformer_checks([floats[s] for s in sorted(floats)], rows)
    return {"float": {"seeds": sorted(floats), "accuracies": [floats[s] for s in sorted(floats)],
                      "mean": stats.mean_std(floats.values())[0], "std": stats.mean_std(floats.values())[1]},
            "rows": dict(rows),
            "controls": {label: {"seeds": [c["seed"] for c in mine], "mean": control_means[label][0][0],
                                 "std": control_means[label][0][1], "change": control_means[label][1]}
                         for label, mine in controls.items()},
            "targets": [{"what": what, "met": met, "measured": measured} for what, met, measured in checks]}


def _float_lines(floats):
    """The schedule-length curve of the float models and what was chosen from it."""
    curve = "; ".join("%g epochs %s" % (p["epochs"], accuracy_table.percent(p["mean"], p["std"]))
                      for p in floats["curve"])
    chosen = BASE_EPOCHS * floats["chosen_ratio"]
    if floats["converged"]:
        verdict = "converged: the next doubling added less than %.1f point" % (100 * baselines.THRESHOLD)
    elif len(floats["curve"]) == 1:
        verdict = ("one length run, so convergence is not shown (`--ratios 1,2,4` doubles it, reusing these "
                   "models)")
    else:
        verdict = "not shown converged: the longest length run, each doubling still added %.1f point or more" % (
            100 * baselines.THRESHOLD)
    return ["- Float (cosine with warm-up, rate 0.1): test accuracy by schedule length, mean over seeds: %s. "
            "Rows start from the %g-epoch models (%s)." % (curve, chosen, verdict)]


def render(payload, command):
    """The BENCHMARKS.md section of a run's results."""
    summary, budget = summarize(payload), payload["budget"]
    floats = summary["float"]
    rows = [("float (starting point)", ",".join(str(s) for s in floats["seeds"]),
             accuracy_table.percent(floats["mean"], floats["std"]), "-", "-")]
    rows += [("%s (control)" % label, ",".join(str(s) for s in c["seeds"]), accuracy_table.percent(c["mean"], c["std"]),
              "%+.2f" % (100 * c["change"]), "-") for label, c in summary["controls"].items()]
    rows += [(label, ",".join(str(s) for s in r["seeds"]), accuracy_table.percent(r["mean"], r["std"]),
              "%+.2f" % (100 * r["change"]), "%+.2f" % (100 * r["vs_control"])) for label, r in summary["rows"].items()]
    lines = ["## Transformer on Fashion-MNIST: W8A8 and W4A8 (issue 35; all 10,000 test images)", "",
             "Command: `%s`" % command, ""]
    lines += machine.machine_lines(payload["machine"], payload["load_before"])
    lines += ["- Model: nets/transformer.py with the script's defaults (4x4 patches as 49 tokens, width 64, 2 "
              "pre-layer-norm blocks of 4 heads, GELU MLP 128)."]
    lines += _float_lines(payload["baselines"])
    lines += ["- Rows fine-tune their seed's float model for %g epoch%s with %s %s: `%s` plus the row's "
              "--uql_weight_bits. First and last layers float; layer norm, softmax and GELU compute in float."
              % (budget["epochs"], "" if budget["epochs"] == 1 else "s", " ".join(budget["finetune"]),
                 " ".join(budget["common"]), CH),
              "- Accuracy: mean ± sample standard deviation over the seeds; 'vs float' is the mean change against "
              "each seed's float model, 'vs float fine-tuned' against the same fine-tuning with nothing quantized.", "",
              publish.markdown_table(("row", "seeds", "test accuracy %", "vs float", "vs float fine-tuned"), rows), ""]
    lines += accuracy_targets.lines_of([(t["what"], t["met"], t["measured"]) for t in summary["targets"]])
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--ratios", help="float schedule lengths to try, as ratios of the %d epochs, e.g. 1,2,4 "
                        "(default %s; --quick %s)" % (BASE_EPOCHS, ",".join("%g" % r for r in FULL["ratios"]),
                                                      ",".join("%g" % r for r in QUICK["ratios"])))
    parser.add_argument("--epochs", type=float, help="fine-tuning epochs of every row (default %g; at most %g)"
                        % (FULL["epochs"], accuracy_table.MAX_EPOCHS))
    parser.add_argument("--work_dir", default="/tmp/tfquant_transformer_accuracy", help="the rows' checkpoints and "
                        "logs")
    parser.add_argument("--cache_dir", help="the float models' cache (default WORK_DIR/baselines)")
    args = parser.parse_args(argv)
    if args.render_json:
        return publish.render_saved(args, SECTION, render)
    mode = QUICK if args.quick else FULL
    seeds = accuracy_table.parse_seeds("0" if args.quick and args.seeds == "0,1,2" else args.seeds)
    ratios = parse_ratios(args.ratios) if args.ratios else mode["ratios"]
    epochs = mode["epochs"] if args.epochs is None else args.epochs
    if not 0 < epochs <= accuracy_table.MAX_EPOCHS:
        raise publish.BenchmarkError("--epochs=%g is not valid; expected more than 0 and at most %g"
                                     % (epochs, accuracy_table.MAX_EPOCHS))
    cache_dir = args.cache_dir or os.path.join(args.work_dir, "baselines")
    load_before = publish.start(args)
    manifest = baselines.converge(cache_dir, seeds, baseline_budget(mode, ratios), args.quick)
    budget = finetune_budget(mode, epochs, cache_dir)
    entries, controls = [], {}
    for seed in seeds:
        entries += run_seed(args.work_dir, seed, budget, controls)
    info = machine.machine_info(load=machine.end_load(args.quick or args.allow_busy))
    payload = {"quick": args.quick, "budget": budget, "machine": info, "load_before": load_before,
               "command": publish.command_line(), "entries": entries, "controls": list(controls.values()),
               "baselines": {key: manifest[key] for key in ("chosen_ratio", "converged", "curve", "baselines",
                                                            "threshold")}}
    payload["summary"] = summarize(payload)
    publish.save_and_publish(args, SECTION, payload, render)
    return payload


if __name__ == "__main__":
    publish.run_main(main)
