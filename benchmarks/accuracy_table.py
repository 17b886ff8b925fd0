"""Accuracy table: ResNet-20 on all 10,000 Fashion-MNIST test images, every row fine-tuned from the float
checkpoint of its seed, through the real run script (`python -m nets.resnet_at_fmnist_run --learner uniform`).

A row is a label and run-script flags (one line in ROWS; `epochs` overrides the fine-tuning budget).
Rows and seeds can be run in parts; each part merges into the results file, and the section shows every
row's mean ± standard deviation over the seeds run so far.

  .venv/bin/python -m benchmarks.accuracy_table                          # every row, seed 0
  .venv/bin/python -m benchmarks.accuracy_table --rows W4A4,"W2A8 channel" --seeds 0,1,2
  .venv/bin/python -m benchmarks.accuracy_table --quick --output /tmp/acc.json --work_dir /tmp/acc
  .venv/bin/python -m benchmarks.accuracy_table --baselines /data/tfquant_baselines --seeds 0,1,2

Every row is also compared with its same-budget float control (benchmarks.float_control): the float checkpoint
fine-tuned with the row's epochs, learning rate, schedule and distillation, nothing quantized. With --baselines
DIR every row fine-tunes the converged float model benchmarks.baselines cached in DIR for its seed.
"""
import argparse
import collections
import contextlib
import importlib
import os
import resource
import shutil
import subprocess
import sys
import typing

from benchmarks import accuracy_targets, float_control, machine, publish, stats

SECTION = "accuracy_table"
CONVERGED_SECTION = "accuracy_converged"  # the table against benchmarks.baselines' converged float models
RUN_MODULE = "nets.resnet_at_fmnist_run"
DEFAULT_RESULTS = os.path.join(publish.RESULTS_DIR, "accuracy_table.json")
CONVERGED_RESULTS = os.path.join(publish.RESULTS_DIR, "accuracy_converged.json")
# Post-training rows run alone (no fine-tuning): their own table, so they can run on float models other than the
# fine-tuning table's.
PTQ_SECTION = "ptq_table"
PTQ_RESULTS = os.path.join(publish.RESULTS_DIR, "ptq_table.json")
MAX_EPOCHS = 5.0  # issue 34: a quantized run fine-tunes at most 5 epochs


class Row(typing.NamedTuple):
    """One table row: its label, the run-script flags that define it, and its own fine-tuning epochs."""

    label: str
    flags: str
    epochs: typing.Optional[float] = None


BASELINE = accuracy_targets.BASELINE
CH = "--uql_use_buckets --uql_bucket_type=channel"
LSQ = " --uql_weight_range=lsq --uql_act_range=lsq"
PACT = " --uql_act_range=pact"
DST = " --enbl_dst"
DEPLOY = " --uql_weight_scheme=symmetric --uql_fold_batch_norms"
# The baseline reproduces PocketFlow's behaviour: batch ranges at evaluation too, no buckets.
ROWS = [
    Row("W8A8", "--uql_weight_bits=8 --uql_activation_bits=8"),
    Row("W4A4", "--uql_weight_bits=4 --uql_activation_bits=4"),
    Row("W4A32 channel", "--uql_weight_bits=4 --uql_activation_bits=32 --uql_use_buckets --uql_bucket_type=channel"),
    Row("W2A8 channel", "--uql_weight_bits=2 --uql_activation_bits=8 --uql_use_buckets --uql_bucket_type=channel"),
    Row("W2A8 split/128", "--uql_weight_bits=2 --uql_activation_bits=8 --uql_use_buckets --uql_bucket_type=split "
        "--uql_bucket_size=128"),
    Row(BASELINE, "--uql_weight_bits=4 --uql_activation_bits=4 --uql_act_range=batch"),
    # Learned ranges (issue 11): channel buckets, first and last layer float unless said otherwise.
    Row("W4A4 ch min/max", CH + " --uql_weight_bits=4 --uql_activation_bits=4"),
    Row("W4A4 ch min/max + dst", CH + " --uql_weight_bits=4 --uql_activation_bits=4" + DST),
    Row("W4A4 ch PACT", CH + " --uql_weight_bits=4 --uql_activation_bits=4" + PACT),
    Row("W4A4 ch PACT + dst", CH + " --uql_weight_bits=4 --uql_activation_bits=4" + PACT + DST),
    Row("W4A4 ch LSQ", CH + " --uql_weight_bits=4 --uql_activation_bits=4" + LSQ),
    Row("W4A4 ch LSQ + dst", CH + " --uql_weight_bits=4 --uql_activation_bits=4" + LSQ + DST),
    Row("W4A4 all layers LSQ + dst", CH + " --uql_weight_bits=4 --uql_activation_bits=4 --uql_quantize_all_layers"
        + LSQ + DST),
    Row("W3A3 ch min/max", CH + " --uql_weight_bits=3 --uql_activation_bits=3"),
    Row("W3A3 ch min/max + dst", CH + " --uql_weight_bits=3 --uql_activation_bits=3" + DST),
    Row("W3A3 ch PACT", CH + " --uql_weight_bits=3 --uql_activation_bits=3" + PACT),
    Row("W3A3 ch PACT + dst", CH + " --uql_weight_bits=3 --uql_activation_bits=3" + PACT + DST),
    Row("W3A3 ch LSQ", CH + " --uql_weight_bits=3 --uql_activation_bits=3" + LSQ),
    Row("W3A3 ch LSQ + dst", CH + " --uql_weight_bits=3 --uql_activation_bits=3" + LSQ + DST),
    # The issue allows up to 3 epochs of fine-tuning: the best W3A3 settings with that budget.
    Row("W3A3 ch LSQ + dst (3 epochs)", CH + " --uql_weight_bits=3 --uql_activation_bits=3" + LSQ + DST, epochs=3.0),
    Row("W3A3 ch PACT (3 epochs)", CH + " --uql_weight_bits=3 --uql_activation_bits=3" + PACT, epochs=3.0),
    Row("W3A3 ch PACT + dst (3 epochs)", CH + " --uql_weight_bits=3 --uql_activation_bits=3" + PACT + DST, epochs=3.0),
    Row("W2A2 ch min/max", CH + " --uql_weight_bits=2 --uql_activation_bits=2"),
    Row("W2A2 ch min/max + dst", CH + " --uql_weight_bits=2 --uql_activation_bits=2" + DST),
    Row("W2A2 ch PACT", CH + " --uql_weight_bits=2 --uql_activation_bits=2" + PACT),
    Row("W2A2 ch PACT + dst", CH + " --uql_weight_bits=2 --uql_activation_bits=2" + PACT + DST),
    Row("W2A2 ch LSQ", CH + " --uql_weight_bits=2 --uql_activation_bits=2" + LSQ),
    Row("W2A2 ch LSQ + dst", CH + " --uql_weight_bits=2 --uql_activation_bits=2" + LSQ + DST),
    # Deployment (issue 13): the grid int8 kernels store and batch norm folded as deployed, against the same bits
    # without them; the W8A8 every-layer row is the one exported to int8 TFLite and ONNX.
    Row("W4A8 ch", CH + " --uql_weight_bits=4 --uql_activation_bits=8"),
    Row("W4A8 ch symmetric folded", CH + " --uql_weight_bits=4 --uql_activation_bits=8" + DEPLOY),
    Row("W8A8 all layers symmetric folded", CH + " --uql_weight_bits=8 --uql_activation_bits=8 "
        "--uql_quantize_all_layers" + DEPLOY),
    # ... and with every tensor the int8 model holds trained (input, outputs before residual adds, logits).
    Row("W8A8 all layers deployable", CH + " --uql_weight_bits=8 --uql_activation_bits=8 "
        "--uql_quantize_all_layers" + DEPLOY + " --uql_quantize_layer_outputs"),
]
# Issue 34: post-training quantization (no fine-tuning, so no float control) with min/max and AdaRound rounding,
# and batch-norm re-estimation after fine-tuning.
PTQ = CH + " --learner=ptq --uql_weight_bits=4 --uql_activation_bits=8"
BN = " --uql_bn_reestimate_batches=20"
ROWS += [
    Row("W4A8 ch PTQ nearest", PTQ),
    Row("W4A8 ch PTQ AdaRound", PTQ + " --uql_adaround"),
    Row("W4A4 ch min/max + BN re-estimation", CH + " --uql_weight_bits=4 --uql_activation_bits=4" + BN),
    Row("W2A2 ch LSQ + dst + BN re-estimation", CH + " --uql_weight_bits=2 --uql_activation_bits=2" + LSQ + DST + BN),
]
# Issue 34's low-bit recipes on the W2A2 LSQ + distillation row: ranges on their own optimizer (Adam, no decay),
# the decay of the 2-bit weights scaled down, freezing of oscillating weights, and all three.
W2A2_LSQ_DST = CH + " --uql_weight_bits=2 --uql_activation_bits=2" + LSQ + DST
RECIPES = {"range Adam": " --uql_range_optimizer=adam", "low-bit decay x0.1": " --uql_low_bit_weight_decay_scale=0.1",
           "freeze oscillations": " --uql_freeze_oscillations=0.02"}
ROWS += [Row("W2A2 ch LSQ + dst + " + name, W2A2_LSQ_DST + flags) for name, flags in RECIPES.items()]
ROWS += [Row("W2A2 ch LSQ + dst + all recipes", W2A2_LSQ_DST + "".join(RECIPES.values()))]
# Issue 34: ternary (codes -1, 0, +1 times a per-channel scale; 2 stored bits) and binary weights, 4-bit LSQ
# activations, distillation.
A4_LSQ_DST = " --uql_activation_bits=4 --uql_act_range=lsq" + DST
ROWS += [Row("W2 ternary A4 ch LSQ + dst", CH + " --uql_weight_bits=2 --uql_weight_range=ternary" + A4_LSQ_DST),
         Row("W1 binary A4 ch LSQ + dst", CH + " --uql_weight_bits=1 --uql_weight_range=binary" + A4_LSQ_DST)]
# The same W2A2 row given the whole fine-tuning budget issue 34 allows (its control trains as long).
ROWS += [Row("W2A2 ch LSQ + dst 5 epochs", W2A2_LSQ_DST, MAX_EPOCHS)]
# Progressive bit-widths (issue 34): the same fine-tuning steps trained first at 8, then 4 bits (labels without
# commas: --rows splits on them).
ROWS += [Row("W2A2 ch LSQ + dst progressive 8-4-2", W2A2_LSQ_DST + " --uql_progressive_bits=8,4,2"),
         Row("W3A3 ch LSQ + dst progressive 8-4-3",
             CH + " --uql_weight_bits=3 --uql_activation_bits=3" + LSQ + DST + " --uql_progressive_bits=8,4,3")]
# Named sets of rows for --rows: issue 34's table against converged float models (every target family first,
# then each low-bit recipe on its own at W2A2, so the table shows which one pays).
ROW_GROUPS = {"issue34": ("W4A4 all layers LSQ + dst", "W3A3 ch LSQ + dst", "W3A3 ch PACT", "W2A2 ch LSQ + dst",
                          "W2A2 ch LSQ + dst + all recipes", "W2A2 ch LSQ + dst 5 epochs",
                          "W2A2 ch LSQ + dst progressive 8-4-2",
                          "W2 ternary A4 ch LSQ + dst", "W1 binary A4 ch LSQ + dst",
                          "W4A8 ch PTQ nearest", "W4A8 ch PTQ AdaRound")
                         + tuple("W2A2 ch LSQ + dst + " + name for name in RECIPES)
                         + ("W2A2 ch LSQ + dst + BN re-estimation",)}
PTQ_ROWS = ("W4A8 ch PTQ nearest", "W4A8 ch PTQ AdaRound")
QUICK_ROWS = ("W8A8", BASELINE)
FULL = {"float": ["--nb_epochs_rat=1.0"], "epochs": 1.0, "finetune": ["--uql_lrn_rate_init=0.01"],
        "common": ["--batch_size=128", "--batch_size_eval=500", "--summ_step=100"]}
QUICK = {"float": ["--nb_epochs_rat=0.02"], "epochs": 0.25, "finetune": ["--uql_lrn_rate_init=0.01"],
         "common": ["--batch_size=32", "--batch_size_eval=100", "--summ_step=4", "--train_subset=256",
                    "--eval_subset=200"]}


def slug(label):
    """A directory name for a row label."""
    return "".join(c if c.isalnum() else "_" for c in label)


def float_dir(work_dir, seed):
    return os.path.join(work_dir, "seed%d" % seed, "float")


def row_dir(work_dir, label, seed):
    return os.path.join(work_dir, "seed%d" % seed, slug(label))


def select_rows(spec):
    """ROWS named by a comma-separated list of labels, their slugs or ROW_GROUPS names (None: every row)."""
    if spec is None:
        return list(ROWS)
    by_name = {}
    for row in ROWS:
        by_name[row.label] = by_name[slug(row.label)] = row
    chosen = []
    names = [part.strip() for part in spec.split(",")]
    for name in [member for name in names for member in ROW_GROUPS.get(name, (name,))]:
        if name not in by_name:
            raise publish.BenchmarkError("--rows=%s is not valid: %r is no row; expected labels among %s"
                                         % (spec, name, ", ".join(repr(r.label) for r in ROWS)))
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    return chosen


def parse_seeds(spec):
    """Seeds from a comma-separated list of non-negative integers."""
    try:
        seeds = [int(part) for part in spec.split(",")]
    except ValueError:
        seeds = None
    if not seeds or any(seed < 0 for seed in seeds):
        raise publish.BenchmarkError("--seeds=%s is not valid; expected non-negative integers such as 0,1,2"
                                     % spec)
    return sorted(set(seeds))


def float_prefix(work_dir, seed, budget):
    """The float checkpoint prefix a seed's rows start from: the cached baseline's with --baselines."""
    if budget.get("baselines"):
        return budget["baseline_prefixes"][str(seed)]
    return "%s/model.ckpt" % float_dir(work_dir, seed)


def with_baselines(budget, cache_dir):
    """The budget whose float models are the baselines cached in cache_dir (its manifest's schedule and seeds)."""
    from benchmarks import baselines  # it builds on this module's budgets
    manifest = baselines.load_manifest(cache_dir)
    # A manifest (or budget) naming no module is of this table's model (the module was recorded later).
    cached, wanted = manifest.get("module", RUN_MODULE), budget.get("module", RUN_MODULE)
    if cached != wanted:
        raise publish.BenchmarkError("--baselines=%s holds float models of %s; expected %s"
                                     % (cache_dir, cached, wanted))
    if manifest["float_common"] != budget["common"]:
        raise publish.BenchmarkError("--baselines=%s was trained with %s; expected this table's %s (quick and full "
                                     "runs do not mix)" % (cache_dir, manifest["float_common"], budget["common"]))
    # Inside the repository (the committed store) the paths are kept relative to it, so a results file merges the
    # runs of any clone; run scripts start in the repository's root.
    return dict(budget, float=manifest["float_flags"], baselines=publish.repo_relative(cache_dir),
                baseline_prefixes={seed: publish.repo_relative(entry["checkpoint_prefix"])
                                   for seed, entry in manifest["baselines"].items()})


def run_flags(work_dir, row, seed, budget):
    """The run-script flags of one (row, seed): shared budget, then the row's own flags (which win)."""
    epochs = budget["epochs"] if row.epochs is None else row.epochs
    if budget.get("baselines") and str(seed) not in budget["baseline_prefixes"]:
        raise publish.BenchmarkError("--baselines=%s has no baseline of seed %d; expected seeds %s"
                                     % (budget["baselines"], seed, ",".join(sorted(budget["baseline_prefixes"]))))
    return (["--learner=uniform", "--save_path=%s" % float_prefix(work_dir, seed, budget),
             "--uql_save_quant_model_path=%s/model.ckpt" % row_dir(work_dir, row.label, seed),
             "--log_dir=%s/logs" % row_dir(work_dir, row.label, seed), "--seed=%d" % seed,
             "--uql_quant_epochs=%s" % epochs] + budget["float"] + budget["finetune"] + budget["common"]
            + row.flags.split())


def run_row(work_dir, row, seed, budget):
    """Run one fine-tuning (training the seed's float checkpoint first if missing) through the budget's run module
    (this table's, RUN_MODULE, unless the budget names another); returns its entry."""
    argv = [sys.executable, "-m", budget.get("module", RUN_MODULE)] + run_flags(work_dir, row, seed, budget)
    seconds, done = stats.timed(lambda: subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True))
    publish.check_run(done, "row %r seed %d" % (row.label, seed))
    results = publish.load_json(os.path.join(row_dir(work_dir, row.label, seed), "results.json"))
    return {"label": row.label, "seed": seed, "flags": row.flags, "quant_flags": argv[3:],
            "epochs": budget["epochs"] if row.epochs is None else row.epochs,
            "accuracy": results["quant_accuracy"], "float_accuracy": results["float_accuracy"],
            "ratio": results["compression_ratio"], "test_examples": results["test_examples"], "seconds": seconds,
            **({"adaround_seconds": results["adaround"]["seconds"],
                "adaround_cpu_seconds": results["adaround"].get("cpu_seconds"),
                "adaround_cpu_by_phase": results["adaround"].get("cpu_seconds_by_phase")}
               if "adaround" in results else {})}


def run_control(work_dir, row, seed, budget, done):
    """The row's same-budget float control for a seed (run once per control label and seed; `done` caches it)."""
    if not float_control.fine_tunes(row.flags):
        return None, None  # post-training quantization: its control is the float model itself
    epochs = budget["epochs"] if row.epochs is None else row.epochs
    label = float_control.control_label(row.flags, epochs)
    if (label, seed) not in done:
        control = Row(label, " ".join(float_control.control_flags(row.flags)), epochs)
        done[(label, seed)] = run_row(work_dir, control, seed, budget)
    return label, done[(label, seed)]["accuracy"]


def comparable(budget):
    """What makes two budgets' results one table: everything but which seeds' baselines were cached then (a
    seed's baseline is named by the cache and the chosen length, both kept)."""
    return {key: value for key, value in budget.items() if key != "baseline_prefixes"}


def merge(existing, new_entries, quick, budget, path):
    """Entries of `existing` (a results payload or None) updated with new_entries, keyed by (label, seed).

    Raises BenchmarkError when `existing` holds results of another kind of run (quick vs full, budget).
    """
    if existing is not None and (existing.get("quick") != quick
                                 or comparable(existing.get("budget") or {}) != comparable(budget)):
        raise publish.BenchmarkError("--output=%s holds results of a different budget (quick=%s); expected "
                                     "quick=%s and budget %s: choose another --output"
                                     % (path, existing.get("quick"), quick, budget))
    merged = {(e["label"], e["seed"]): e for e in (existing or {}).get("entries", [])}
    merged.update({(e["label"], e["seed"]): e for e in new_entries})
    order = {row.label: i for i, row in enumerate(ROWS)}
    entries = sorted(merged.values(), key=lambda e: (order.get(e["label"], len(order)), e["label"], e["seed"]))
    for seed in sorted({e["seed"] for e in entries}):
        floats = {e["float_accuracy"] for e in entries if e["seed"] == seed}
        if len(floats) > 1:
            raise publish.BenchmarkError("%s: the rows of seed %d report different float accuracies %s; expected "
                                         "one float checkpoint per seed" % (path, seed, sorted(floats)))
    return entries


def summarize(entries):
    """Per row label (in ROWS order): seeds, accuracy mean/std, mean change against float, ratio."""
    float_by_seed = {e["seed"]: e["float_accuracy"] for e in entries}
    table = collections.OrderedDict()
    for label in [row.label for row in ROWS] + sorted({e["label"] for e in entries} - {r.label for r in ROWS}):
        mine = [e for e in entries if e["label"] == label]
        if not mine:
            continue
        mean, std = stats.mean_std(e["accuracy"] for e in mine)
        change, _ = stats.mean_std(e["accuracy"] - float_by_seed[e["seed"]] for e in mine)
        control = None
        if all(e.get("control_accuracy") is not None for e in mine):
            control = stats.mean_std(e["accuracy"] - e["control_accuracy"] for e in mine)[0]
        table[label] = {"seeds": [e["seed"] for e in mine], "mean": mean, "std": std, "change": change,
                        "ratio": mine[0]["ratio"], "epochs": mine[0]["epochs"], "vs_control": control}
    return table


def percent(mean, std):
    """A fraction and its deviation as percent: '91.20 ± 0.30' ('91.20' when std is None)."""
    return "%.2f" % (100 * mean) if std is None else "%.2f ± %.2f" % (100 * mean, 100 * std)


def is_ptq_part(labels, baselines):
    """Whether rows of `labels` form the post-training table: all of them PTQ rows, not on cached baselines."""
    return bool(labels) and not baselines and all(label in PTQ_ROWS for label in labels)


def section_of(payload):
    """The BENCHMARKS.md section of a results payload: the converged-float table when its rows fine-tuned the
    cached baselines, the post-training table when it holds only PTQ rows."""
    if payload["budget"].get("baselines"):
        return CONVERGED_SECTION
    return PTQ_SECTION if is_ptq_part([e["label"] for e in payload["entries"]], False) else SECTION


def render(payload, command):
    entries = payload["entries"]
    table = summarize(entries)
    float_by_seed = {e["seed"]: e["float_accuracy"] for e in entries}
    float_mean, float_std = stats.mean_std(float_by_seed.values())
    budget = payload["budget"]
    rows = [("float (starting point)", ",".join(str(s) for s in sorted(float_by_seed)),
             percent(float_mean, float_std), "-", "-", "1.00x")]
    rows += [(label, ",".join(str(s) for s in t["seeds"]), percent(t["mean"], t["std"]),
              "%+.2f" % (100 * t["change"]), "-" if t["vs_control"] is None else "%+.2f" % (100 * t["vs_control"]),
              "%.2fx" % t["ratio"]) for label, t in table.items()]
    converged = bool(budget.get("baselines"))
    ptq = section_of(payload) == PTQ_SECTION
    expected = ROW_GROUPS["issue34"] if converged else PTQ_ROWS if ptq else [row.label for row in ROWS]
    missing = [label for label in expected if label not in table]
    title = ("Accuracy against converged float models (issue 34; ResNet-20, Fashion-MNIST, all 10,000 test images)"
             if converged else "Post-training quantization: nearest rounding and AdaRound (issue 34; ResNet-20, "
             "Fashion-MNIST, all 10,000 test images)" if ptq else
             "Accuracy table (ResNet-20, Fashion-MNIST, all 10,000 test images)")
    lines = ["## " + title, "",
             "Command (the last part run): `%s`" % command, ""]
    lines += machine.machine_lines(payload["machine"], payload["load_before"])
    lines += ["- Float: %s per seed; %s. First and last layers float; compression counts every stored bit."
              % (" ".join(budget["float"]), "each row calibrates that seed's checkpoint, no fine-tuning: %s"
                 % " ".join(budget["common"]) if ptq else "each row fine-tunes that seed's checkpoint: "
                 "--uql_quant_epochs=%s (unless the row sets its own) %s"
                 % (budget["epochs"], " ".join(budget["finetune"] + budget["common"]))),
              "- Accuracy: mean ± sample standard deviation over the seeds listed; 'vs float' is the mean change "
              "against each seed's own float model; 'vs float fine-tuned' against that float model fine-tuned with "
              "the row's epochs, learning rate, schedule and distillation, nothing quantized ('-': not measured).", "",
              publish.markdown_table(("row", "seeds", "test accuracy %", "vs float", "vs float fine-tuned",
                                      "model compression"), rows), ""]
    if ptq:
        lines += ptq_lines(entries, payload.get("float_epoch_cpu_seconds"))
        lines += accuracy_targets.lines_of(accuracy_targets.ptq_checks(table, "its float model"))
    else:
        lines += accuracy_targets.target_lines(table, converged)
    busy = sorted({"%s (seed %d)" % (e["label"], e["seed"]) for e in entries if e.get("busy")})
    if busy:
        lines.append("- Measured on a busy machine (published with --allow_busy; the load slows a run, it does not "
                     "enter its computation): %s." % ", ".join(busy))
    if missing:
        lines.append("- Not run yet: %s." % ", ".join(missing))
    return "\n".join(lines)


# Float training of two lengths, in epochs of the training set: the difference of their CPU seconds is that of the
# extra steps alone (start-up, data loading and the final evaluation cancel out).
EPOCH_CPU_EPOCHS = (0.15, 0.6)
ADAROUND_COMPUTE_SHARE = 0.05  # issue 34: AdaRound at most 5 % of one float epoch's compute


def _base_epochs(run_module):
    """Epochs of a run module's standard budget (--nb_epochs_rat=1): its ModelHelper's base_epochs."""
    helper_module = importlib.import_module(run_module[:-len("_run")] if run_module.endswith("_run") else run_module)
    return float(helper_module.ModelHelper.base_epochs)


def float_epoch_cpu_seconds(work_dir, seed, budget):
    """CPU seconds (user + system, every thread) of one float training epoch through the run module: two fresh
    float runs of EPOCH_CPU_EPOCHS epochs (--nb_epochs_rat scales the module's base_epochs), the difference
    scaled to one epoch."""
    module = budget.get("module", RUN_MODULE)
    base_epochs = _base_epochs(module)
    used = []
    for epochs in EPOCH_CPU_EPOCHS:
        directory = os.path.join(work_dir, "float_epoch_cpu", "epochs_%g" % epochs)
        shutil.rmtree(directory, ignore_errors=True)
        argv = [sys.executable, "-m", module, "--learner=full-prec",
                "--save_path=%s/model.ckpt" % directory, "--log_dir=%s/logs" % directory, "--seed=%d" % seed,
                "--nb_epochs_rat=%g" % (epochs / base_epochs)] + budget["common"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        publish.check_run(done, "float run of %g epoch" % epochs)
        used.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return (used[1] - used[0]) / (EPOCH_CPU_EPOCHS[1] - EPOCH_CPU_EPOCHS[0])


def ptq_lines(entries, float_epoch_cpu=None):
    """The post-training table's notes: what the rows are and AdaRound's calibration time per seed (wall clock,
    and CPU seconds against a float epoch's when `float_epoch_cpu` was measured)."""
    lines = ["- No fine-tuning: each row calibrates its seed's float checkpoint (activation ranges over "
             "--uql_calib_batches training batches, no labels) and rounds the weights to nearest, or with AdaRound "
             "(--uql_adaround); the float model is the control. The targets are judged against the float model "
             "above; issue 34 asks them against a converged float model too (the converged table's PTQ rows)."]
    timed = [e for e in entries if e.get("adaround_seconds") is not None]
    if timed:
        lines.append("- AdaRound's calibration, seconds per seed (wall clock, on the load recorded above): %s."
                     % ", ".join("seed %d %.1f" % (e["seed"], e["adaround_seconds"])
                                 for e in sorted(timed, key=lambda e: e["seed"])))
    cpu = sorted((e for e in timed if e.get("adaround_cpu_seconds") is not None), key=lambda e: e["seed"])
    if cpu:
        share = (lambda e: " (%.1f %% of a float epoch)" % (100 * e["adaround_cpu_seconds"] / float_epoch_cpu)
                 ) if float_epoch_cpu else (lambda e: "")
        lines.append("- AdaRound's calibration, CPU seconds per seed (every thread of the process): %s%s."
                     % (", ".join("seed %d %.1f%s" % (e["seed"], e["adaround_cpu_seconds"], share(e)) for e in cpu),
                        "; a float training epoch: %.0f CPU seconds (float runs of %g and %g epoch, the difference "
                        "scaled to one; same load)" % ((float_epoch_cpu,) + EPOCH_CPU_EPOCHS)
                        if float_epoch_cpu else ""))
        if float_epoch_cpu:
            worst = max(e["adaround_cpu_seconds"] for e in cpu) / float_epoch_cpu
            lines.append("- Target: AdaRound's calibration at most %g %% of a float epoch's compute: %s (at most "
                         "%.1f %%, %d seeds)." % (100 * ADAROUND_COMPUTE_SHARE, "met" if worst <= ADAROUND_COMPUTE_SHARE
                                                  else "**not met**", 100 * worst, len(cpu)))
        phases = collections.defaultdict(list)
        for entry in cpu:
            for phase, seconds in (entry.get("adaround_cpu_by_phase") or {}).items():
                phases[phase].append(seconds)
        if phases:
            lines.append("- Its CPU seconds by phase, mean over the seeds: %s."
                         % ", ".join("%s %.2f" % (phase, sum(v) / len(v)) for phase, v in phases.items()))
    return lines


def save_results(output, args, budget, load_before, new_entries, epoch_cpu, final):
    """Merge this invocation's entries into the results file (when there is one); returns the payload."""
    # Accuracy does not depend on the load: a part published with --allow_busy (parts run side by side)
    # records the load at once rather than waiting up to machine.SETTLE_SECONDS for the others to end.
    info = machine.machine_info(load=machine.end_load(args.quick or args.allow_busy or not final))
    busy = bool(machine.busy_readings(load_before, info["load_average"], info["cores"]))
    for entry in new_entries:
        entry.setdefault("busy", busy)
    # Several parts may run at once into one results file: merge with the file as it is now, not as it was
    # when this part started, so no part drops another's rows.
    with publish.locked(output) if output else contextlib.nullcontext():
        existing = publish.load_json(output) if output and os.path.exists(output) else None
        payload = {"quick": args.quick, "budget": budget, "machine": info, "load_before": load_before,
                   "command": publish.command_line(),
                   "entries": merge(existing, new_entries, args.quick, budget, output)}
        epoch_cpu = epoch_cpu if epoch_cpu is not None else (existing or {}).get("float_epoch_cpu_seconds")
        if epoch_cpu is not None:
            payload["float_epoch_cpu_seconds"] = epoch_cpu
        if output:
            publish.write_json(output, payload)
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser, output_help="results file the run merges into (default %s; none with --quick)"
                          % os.path.relpath(DEFAULT_RESULTS, publish.REPO_ROOT))
    parser.add_argument("--rows", help="comma-separated row labels (default: every row; --quick: %s)"
                        % ", ".join(QUICK_ROWS))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    parser.add_argument("--work_dir", default="/tmp/tfquant_accuracy_table", help="checkpoints and logs")
    parser.add_argument("--baselines", help="fine-tune from the float models benchmarks.baselines cached here")
    parser.add_argument("--no_controls", action="store_true", help="skip the same-budget float controls")
    parser.add_argument("--rerun", action="store_true", help="run the (row, seed) pairs the results file already "
                        "holds again (default: keep them and run only the missing ones)")
    parser.add_argument("--no_epoch_cpu", action="store_true",
                        help="with the AdaRound row, skip measuring a float epoch's CPU seconds (two short float runs)")
    parser.add_argument("--epochs", type=float, help="fine-tuning epochs of every row that sets none (default %g; "
                        "at most %g)" % (FULL["epochs"], MAX_EPOCHS))
    args = parser.parse_args(argv)
    if args.render_json:
        # The section again from a results file (e.g. after parts run side by side), nothing run.
        payload = publish.load_full_run(args.render_json)
        publish.publish(section_of(payload), render(payload, payload.get("command", "(not recorded)")), args.markdown,
                        payload["load_before"], payload["machine"]["load_average"], args.allow_busy)
        return payload
    rows = select_rows(args.rows if args.rows or not args.quick else ",".join(QUICK_ROWS))
    seeds = parse_seeds(args.seeds)
    ptq = is_ptq_part([row.label for row in rows], args.baselines)
    output = args.output or (None if args.quick else CONVERGED_RESULTS if args.baselines else
                             PTQ_RESULTS if ptq else DEFAULT_RESULTS)
    budget = QUICK if args.quick else FULL
    if args.epochs is not None:
        if not 0 < args.epochs <= MAX_EPOCHS:
            raise publish.BenchmarkError("--epochs=%g is not valid; expected more than 0 and at most %g"
                                         % (args.epochs, MAX_EPOCHS))
        budget = dict(budget, epochs=args.epochs)
    if args.baselines:
        budget = with_baselines(budget, args.baselines)
    existing = publish.load_json(output) if output and os.path.exists(output) else None
    merge(existing, [], args.quick, budget, output)  # refuse a mismatched results file before any run
    load_before = publish.start(args)
    os.makedirs(args.work_dir, exist_ok=True)
    # A results file already holding a (row, seed) of this budget: that run is not repeated (--rerun repeats it),
    # and the controls it measured are reused, so a long table finishes over several invocations.
    done_before = {} if args.rerun else {(e["label"], e["seed"]): e for e in (existing or {}).get("entries", [])}
    controls = {(e["control_label"], e["seed"]): {"accuracy": e["control_accuracy"]}
                for e in done_before.values() if e.get("control_label") is not None}
    new_entries = []
    for seed in seeds:
        for row in rows:
            if (row.label, seed) in done_before:
                print("seed %d %-40s in %s already; not run again" % (seed, row.label, output), flush=True)
                continue
            entry = run_row(args.work_dir, row, seed, budget)
            if not args.no_controls:
                entry["control_label"], entry["control_accuracy"] = run_control(args.work_dir, row, seed, budget,
                                                                                controls)
            new_entries.append(entry)
            print("seed %d %-40s %.4f (float %.4f, float fine-tuned %s, %.0f s)"
                  % (seed, row.label, entry["accuracy"], entry["float_accuracy"],
                     "-" if entry.get("control_accuracy") is None else "%.4f" % entry["control_accuracy"],
                     entry["seconds"]),
                  flush=True)
            if output and not args.quick:
                # Kept at once: a run stopped part-way keeps every finished row.
                save_results(output, args, budget, load_before, new_entries, None, final=False)
    epoch_cpu = None
    if ptq and not args.quick and not args.no_epoch_cpu and any("--uql_adaround" in row.flags for row in rows):
        epoch_cpu = float_epoch_cpu_seconds(args.work_dir, seeds[0], budget)
        print("float epoch: %.0f CPU seconds" % epoch_cpu, flush=True)
    payload = save_results(output, args, budget, load_before, new_entries, epoch_cpu, final=True)
    if not args.quick:
        publish.publish(section_of(payload), render(payload, publish.command_line()), args.markdown, load_before,
                        payload["machine"]["load_average"], args.allow_busy)
    return payload


if __name__ == "__main__":
    publish.run_main(main)
