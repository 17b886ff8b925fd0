"""Does `--exec_mode analyze` point at the right layer? ResNet-20 W2A2 on Fashion-MNIST, checked by fine-tuning.

For each seed: fine-tune the float checkpoint to W2A2 (channel buckets), run `--exec_mode analyze` on 2,000 test
images (timed: wall and CPU time of the whole command, load average before and after), then fine-tune W2A2 again
once per layer among the analysis's top 3, with the 8-bit override the analysis printed for it and the same
budget. The analysis is right when its worst layer's override recovers the most accuracy (measured on the whole
test set against the plain W2A2 run); the rank correlation of what the analysis predicted against the measured
recovery is shown too: the loss its override removes (what it ranks by: every layer quantized, this one at the
override's width, no training), and its older measurements (accuracy gained by keeping the layer float, accuracy
lost by quantizing it alone).

  .venv/bin/python -m benchmarks.analysis_check                                   # seed 0
  .venv/bin/python -m benchmarks.analysis_check --baselines /data/tfquant_baselines --seeds 0,1,2
  .venv/bin/python -m benchmarks.analysis_check --quick --output /tmp/check.json --work_dir /tmp/check
"""
import argparse
import os
import resource
import shlex
import subprocess
import sys

from benchmarks import accuracy_table, machine, publish, stats

SECTION = "analysis_check"
TOP = 3
# Issue 37's budget for the analysis of ResNet-20 on 2,000 evaluation images.
TARGET_SECONDS = 180.0
W2A2 = accuracy_table.CH + " --uql_weight_bits=2 --uql_activation_bits=2"
FULL = dict(accuracy_table.FULL, module=accuracy_table.RUN_MODULE, model="ResNet-20", analysis_images=2000,
            extra=[])
# A tiny net (PocketFlow's ConvNet, every layer quantized so that there are more than 3 targets), few steps.
QUICK = dict(accuracy_table.QUICK, module="nets.convnet_at_fmnist_run", model="ConvNet (--quick)",
             analysis_images=200, extra=["--uql_quantize_all_layers"])


def override_flags(override):
    """The run-script flags of an override the analysis printed, e.g. "--uql_weight_overrides 'a/b=8'"."""
    parts = shlex.split(override)
    if len(parts) != 2 or not parts[0].startswith("--uql_"):
        raise publish.BenchmarkError("the analysis printed the override %r; expected a flag and its value" % override)
    return ["%s=%s" % (parts[0], parts[1])]


def base_row(budget):
    return accuracy_table.Row("W2A2 ch", " ".join([W2A2] + budget["extra"]))


def override_row(budget, rank, entry):
    return accuracy_table.Row("W2A2 ch top%d override" % rank,
                              " ".join([base_row(budget).flags] + override_flags(entry["override"])))


def _run(argv, what):
    done = subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True)
    publish.check_run(done, "%s (%s)" % (what, shlex.join(argv)))
    return done.stdout


def fine_tune(work_dir, row, seed, budget):
    """One W2A2 fine-tuning through the run script; returns {label, flags, accuracy, float_accuracy, seconds}."""
    flags = accuracy_table.run_flags(work_dir, row, seed, budget)
    seconds, _ = stats.timed(lambda: _run([sys.executable, "-m", budget["module"]] + flags, row.label))
    results = publish.load_json(os.path.join(accuracy_table.row_dir(work_dir, row.label, seed), "results.json"))
    return {"label": row.label, "flags": flags, "accuracy": results["quant_accuracy"],
            "float_accuracy": results["float_accuracy"], "test_examples": results["test_examples"],
            "seconds": seconds}


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def analyze(work_dir, seed, budget):
    """`--exec_mode analyze` of the W2A2 run, timed; returns analysis.json's contents and the timing."""
    row = base_row(budget)
    argv = ([sys.executable, "-m", budget["module"]] + accuracy_table.run_flags(work_dir, row, seed, budget)
            + ["--exec_mode=analyze", "--eval_subset=%d" % budget["analysis_images"]])
    load_before, cpu_before = machine.read_load(), _children_cpu()
    wall, stdout = stats.timed(lambda: _run(argv, "the analysis"))
    cpu, load_after = _children_cpu() - cpu_before, machine.read_load()
    analysis = publish.load_json(os.path.join(accuracy_table.row_dir(work_dir, row.label, seed), "analysis.json"))
    return {"command": shlex.join(["python", "-m", budget["module"]] + argv[3:]), "wall_seconds": wall,
            "cpu_seconds": cpu, "load_before": load_before, "load_after": load_after,
            "analysis_seconds": analysis["seconds"], "examples": analysis["examples"],
            "targets": len(analysis["layers"]), "float_accuracy": analysis["float_accuracy"],
            "quantized_accuracy": analysis["quantized_accuracy"], "top": analysis["layers"][:TOP],
            "printed": [line for line in stdout.splitlines() if "fix: --uql_" in line][:TOP]}


def ranks(values):
    """Ranks 1..n of `values` (ascending), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2.0 + 1
        start = end + 1
    return result


def spearman(xs, ys):
    """Spearman's rank correlation (Pearson's on tie-averaged ranks); None when either side is constant."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / (sxx * syy) ** 0.5


def check_seed(work_dir, seed, budget):
    """Base W2A2 run, its analysis, and one run per top-3 override; returns the seed's entry."""
    base = fine_tune(work_dir, base_row(budget), seed, budget)
    analysis = analyze(work_dir, seed, budget)
    overrides = []
    for rank, entry in enumerate(analysis["top"], 1):
        run = fine_tune(work_dir, override_row(budget, rank, entry), seed, budget)
        run.update(rank=rank, layer=entry["weight_variable"] or entry["name"], kind=entry["kind"],
                   override=entry["override"], predicted_recovery=entry["recovery_if_float"],
                   predicted_drop=entry["drop_alone"], predicted_loss_recovery=entry["loss_recovery_at_override"],
                   predicted_override_recovery=entry["recovery_at_override"],
                   measured_recovery=run["accuracy"] - base["accuracy"])
        overrides.append(run)
    return {"seed": seed, "base": base, "analysis": analysis, "overrides": overrides, **judge(overrides)}


def judge(overrides):
    """Whether the analysis's worst layer (rank 1) recovered the most, and the rank correlations."""
    measured = [run["measured_recovery"] for run in overrides]
    best = max(measured)
    return {"worst_recovers_most": measured[0] == best,
            "tied_best": sum(1 for value in measured if value == best) > 1,
            "spearman_loss_at_override": spearman([run["predicted_loss_recovery"] for run in overrides], measured),
            "spearman_recovery": spearman([run["predicted_recovery"] for run in overrides], measured),
            "spearman_drop": spearman([run["predicted_drop"] for run in overrides], measured)}


def _points(value):
    return "–" if value is None else "%+.2f" % (100 * value)


def _loss(value):
    return "–" if value is None else "%+.4f" % value


def _rho(value):
    return "undefined" if value is None else "%+.2f" % value


def render(payload):
    """The BENCHMARKS.md section of a results payload."""
    budget = payload["budget"]
    lines = ["## Layer analysis check (%s W2A2, Fashion-MNIST)" % budget["model"], "",
             "Command: `%s`" % payload["command"], ""]
    lines += machine.machine_lines(payload["machine"], payload["load_before"])
    lines += ["- Each seed: the float checkpoint (%s) fine-tuned to W2A2 with channel buckets, --uql_quant_epochs=%s "
              "%s; `--exec_mode analyze` on the first %d test images; then the same fine-tuning once per layer "
              "among the analysis's top %d with the 8-bit override it printed. Accuracy on the %d test images "
              "every run evaluates; 'measured recovery' is the override run's accuracy minus the plain W2A2 run's "
              "(same seed, same float checkpoint, same data order)."
              % (" ".join(budget["float"]), budget["epochs"], " ".join(budget["finetune"] + budget["common"]),
                 budget["analysis_images"], TOP, payload["seeds"][0]["base"]["test_examples"]), ""]
    for seed in payload["seeds"]:
        analysis = seed["analysis"]
        lines += ["### Seed %d: W2A2 %.2f %%, float %.2f %%" % (seed["seed"], 100 * seed["base"]["accuracy"],
                                                               100 * seed["base"]["float_accuracy"]), "",
                  "- Analysis: %d targets on %d images: %.1f s wall for the whole command (%.1f s CPU; %.1f s wall "
                  "inside the analysis itself), load average %s before, %s after; analysis accuracies float %.2f %%, "
                  "W2A2 %.2f %%."
                  % (analysis["targets"], analysis["examples"], analysis["wall_seconds"], analysis["cpu_seconds"],
                     analysis["analysis_seconds"], analysis["load_before"], analysis["load_after"],
                     100 * analysis["float_accuracy"], 100 * analysis["quantized_accuracy"]), ""]
        rows = [(run["rank"], "`%s` (%s)" % (run["layer"], run["kind"]), _loss(run.get("predicted_loss_recovery")),
                 _points(run.get("predicted_override_recovery")), _points(run["predicted_recovery"]),
                 _points(run["predicted_drop"]), "`%s`" % run["override"], "%.2f" % (100 * run["accuracy"]),
                 _points(run["measured_recovery"])) for run in seed["overrides"]]
        lines += [publish.markdown_table(("rank", "layer", "analysis: loss removed at override (ranks by)",
                                          "analysis: gain at override", "analysis: gain if float",
                                          "analysis: drop alone", "override", "accuracy % with it",
                                          "measured recovery"), rows), "",
                  "- Spearman rank correlation with the measured recovery: analysis's loss removed at the override "
                  "%s, its gain if float %s, its drop alone %s (over %d layers)."
                  % (_rho(seed.get("spearman_loss_at_override")), _rho(seed["spearman_recovery"]),
                     _rho(seed["spearman_drop"]), len(seed["overrides"])), ""]
    lines += target_lines(payload)
    return "\n".join(lines)


def target_lines(payload):
    """Issue 37's two targets on the seeds run."""
    seeds = payload["seeds"]
    right = [s["seed"] for s in seeds if s["worst_recovers_most"]]
    slowest = max(s["analysis"]["wall_seconds"] for s in seeds)
    ties = [s["seed"] for s in seeds if s["worst_recovers_most"] and s["tied_best"]]
    return ["- Target: the analysis's worst layer is the one whose 8-bit override recovers the most: %s (%d of %d "
            "seeds%s)." % ("met" if len(right) == len(seeds) else "**not met**", len(right), len(seeds),
                           "; tied with another override in seeds %s" % ties if ties else ""),
            "- Target: analysis of %d targets on %d images within %.0f s: %s (%.1f s, the whole command's wall "
            "time, slowest seed)." % (seeds[0]["analysis"]["targets"], seeds[0]["analysis"]["examples"],
                                      TARGET_SECONDS, "met" if slowest <= TARGET_SECONDS else "**not met**",
                                      slowest)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--epochs", type=float, help="fine-tuning epochs of every run (default %s; --quick %s)"
                        % (FULL["epochs"], QUICK["epochs"]))
    parser.add_argument("--work_dir", default="/tmp/tfquant_analysis_check", help="checkpoints and logs")
    parser.add_argument("--baselines", help="fine-tune from the float models benchmarks.baselines cached here")
    args = parser.parse_args(argv)
    if args.render_json:
        payload = publish.load_full_run(args.render_json)
        publish.publish(SECTION, render(payload), args.markdown, payload["load_before"],
                        payload["machine"]["load_average"], args.allow_busy)
        return payload
    if args.epochs is not None and not args.epochs > 0:
        raise publish.BenchmarkError("--epochs=%s is not valid; expected a positive number" % args.epochs)
    seeds = accuracy_table.parse_seeds(args.seeds)
    budget = dict(QUICK if args.quick else FULL)
    if args.epochs is not None:
        budget["epochs"] = args.epochs
    if args.baselines:
        budget = accuracy_table.with_baselines(budget, args.baselines)
    load_before = publish.start(args)
    os.makedirs(args.work_dir, exist_ok=True)
    entries = []
    for seed in seeds:
        entries.append(check_seed(args.work_dir, seed, budget))
        print("seed %d: W2A2 %.4f; analysis %.1f s; overrides %s; worst recovers most: %s"
              % (seed, entries[-1]["base"]["accuracy"], entries[-1]["analysis"]["wall_seconds"],
                 ", ".join("%s %+.4f" % (run["layer"], run["measured_recovery"]) for run in entries[-1]["overrides"]),
                 entries[-1]["worst_recovers_most"]), flush=True)
    info = machine.machine_info(load=machine.end_load(args.quick))
    payload = {"quick": args.quick, "budget": budget, "machine": info, "load_before": load_before,
               "command": publish.command_line(), "seeds": entries}
    publish.write_json(publish.results_path(args, SECTION), payload)
    if not args.quick:
        publish.publish(SECTION, render(payload), args.markdown, load_before, info["load_average"], args.allow_busy)
    return payload


if __name__ == "__main__":
    publish.run_main(main)
