"""Converged float baselines: a float model per seed (ResNet-20 on Fashion-MNIST here), cached with its settings
and command.

A quantized result is only as honest as the float model it is compared with: a 3-epoch float model that the
quantized run then trains further credits the extra training to quantization. This trains the float model with
the model's standard schedule (cosine with warm-up) at doubling lengths (--nb_epochs_rat 1, 2, 4, 8, 16 of the 3
standard epochs) for every seed, and stops at the first length whose next doubling adds less than 0.1 point of
test accuracy, averaged over the seeds: the curve of accuracy against schedule length is recorded to show it. Each
length's checkpoints stay in the cache with the run's settings record (written by the learner beside them) and
`command.json` (the exact command, its accuracy); `baselines.json` at the cache's top names the chosen length.
`benchmarks.accuracy_table --baselines DIR` fine-tunes every row from these checkpoints. Another model's benchmark
(benchmarks.transformer_accuracy) calls `converge` with its own run module, standard epochs and lengths.

  .venv/bin/python -m benchmarks.baselines --cache_dir /data/tfquant_baselines --seeds 0,1,2    # hours
  .venv/bin/python -m benchmarks.baselines --quick --cache_dir /tmp/baselines                   # seconds

Training them takes longer than one working session on the project's machine, so finished runs are also kept in
the repository (--store, default benchmarks/results/baselines for the full budget): each run's record, settings,
training log and a checkpoint of the model's variables (the optimizer's slots dropped: fine-tuning restores only
the model), about 1.1 MB per run. A run found in the store is copied into the cache instead of being trained again;
the store's own manifest (paths relative to it) lets `accuracy_table --baselines benchmarks/results/baselines`
fine-tune from a fresh clone. --ratios trains chosen lengths only (e.g. the long ones first).
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys

from benchmarks import accuracy_table, machine, publish, stats

RUN_MODULE = accuracy_table.RUN_MODULE
MANIFEST = "baselines.json"
COMMAND = "command.json"
THRESHOLD = 0.001  # a longer schedule adding less than 0.1 point of accuracy: converged
# A budget: the run module, its standard schedule's epochs (what --nb_epochs_rat=1 trains), the schedule lengths
# tried in order (ratios of it) and the flags every run of the cache shares.
FULL = {"module": RUN_MODULE, "base_epochs": 3, "ratios": [1.0, 2.0, 4.0, 8.0, 16.0],
        "common": accuracy_table.FULL["common"]}
QUICK = dict(FULL, ratios=[0.02, 0.04], common=accuracy_table.QUICK["common"])
STORE = os.path.join(publish.REPO_ROOT, "benchmarks", "results", "baselines")  # the committed full-budget runs
PATH_FLAGS = ("--save_path=", "--log_dir=")  # where a run wrote; not what defines its model


def length_dir(cache_dir, ratio, seed):
    """Where the float run of one schedule length and seed lives."""
    return os.path.join(cache_dir, "ratio%g" % ratio, "seed%d" % seed)


def checkpoint_prefix(cache_dir, ratio, seed):
    return os.path.join(length_dir(cache_dir, ratio, seed), "float", "model.ckpt")


def float_flags(ratio, budget):
    """The run-script flags that define a baseline's float model (a fine-tuning run must repeat them)."""
    return ["--nb_epochs_rat=%g" % ratio] + list(budget["common"])


def train_flags(cache_dir, ratio, seed, budget):
    return (["--learner=full-prec", "--save_path=%s" % checkpoint_prefix(cache_dir, ratio, seed),
             "--log_dir=%s" % os.path.join(length_dir(cache_dir, ratio, seed), "logs"), "--seed=%d" % seed]
            + float_flags(ratio, budget))


def finished(cache_dir, ratio, seed):
    """Whether the cache (or store) holds the finished run of this length and seed."""
    return os.path.isfile(os.path.join(length_dir(cache_dir, ratio, seed), COMMAND))


def defining(flags):
    """The flags that define a float model, without the paths it was written to."""
    return [flag for flag in flags if not flag.startswith(PATH_FLAGS)]


def resolved(entry, run_dir):
    """A run record with its checkpoint and settings paths absolute (a stored record keeps them relative)."""
    entry = dict(entry)
    for key in ("checkpoint_prefix", "settings_record"):
        if key in entry and not os.path.isabs(entry[key]):
            entry[key] = os.path.normpath(os.path.join(run_dir, entry[key]))
    return entry


def strip_optimizer_slots(checkpoint, destination_prefix):
    """Write the variables of `checkpoint` without the optimizer's slots (VAR/Momentum of a variable VAR) as
    destination_prefix-STEP, with its state file; returns the new checkpoint prefix."""
    import tensorflow as tf  # only storing needs TensorFlow
    from tfquant import checkpoints

    step = checkpoints.validate_checkpoint(checkpoint)
    reader = tf.train.load_checkpoint(checkpoint)
    names = sorted(reader.get_variable_to_shape_map())
    kept = [name for name in names if not (name.endswith("/Momentum") and name[:-len("/Momentum")] in names)]
    target = "%s-%d" % (destination_prefix, step)
    tf.raw_ops.SaveV2(prefix=target, tensor_names=kept, shape_and_slices=[""] * len(kept),
                      tensors=[tf.constant(reader.get_tensor(name)) for name in kept])
    name = os.path.basename(target)  # relative, so that any clone of the store reads its own files
    with open(os.path.join(os.path.dirname(target), "checkpoint"), "w") as handle:
        handle.write('model_checkpoint_path: "%s"\nall_model_checkpoint_paths: "%s"\n' % (name, name))
    return target


def store_run(entry, cache_dir, store_dir):
    """Copy a finished run of the cache into the store: record (paths relative), settings, log, model variables."""
    ratio, seed = entry["ratio"], entry["seed"]
    source, target = length_dir(cache_dir, ratio, seed), length_dir(store_dir, ratio, seed)
    if finished(store_dir, ratio, seed):
        return
    staging = target + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "float"))
    from tfquant import checkpoints
    latest = checkpoints.latest_valid_checkpoint(checkpoint_prefix(cache_dir, ratio, seed))[0]
    strip_optimizer_slots(latest, os.path.join(staging, "float", "model.ckpt"))
    shutil.copy(entry["settings_record"], os.path.join(staging, "float", os.path.basename(entry["settings_record"])))
    shutil.copy(os.path.join(source, "train.log"), os.path.join(staging, "train.log"))
    record = dict(entry, checkpoint_prefix=os.path.join("float", "model.ckpt"),
                  settings_record=os.path.join("float", os.path.basename(entry["settings_record"])),
                  stored=machine.machine_info())
    publish.write_json(os.path.join(staging, COMMAND), record)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(staging, target)  # a run is in the store whole or not at all


def fetch_stored(store_dir, cache_dir, ratio, seed):
    """Copy a stored run into the cache when the cache lacks it (the run is then not trained again)."""
    source, target = length_dir(store_dir, ratio, seed), length_dir(cache_dir, ratio, seed)
    if finished(cache_dir, ratio, seed) or not finished(store_dir, ratio, seed):
        return
    if os.path.exists(target):
        raise publish.BenchmarkError("%s holds an unfinished run of ratio %g seed %d while %s has it finished; "
                                     "expected to take the stored one: move %s away" % (cache_dir, ratio, seed,
                                                                                        store_dir, target))
    shutil.copytree(source, target)


def _run(argv):
    done = subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True)
    publish.check_run(done, shlex.join(argv))
    return done.stdout


def parse_accuracy(stdout):
    """The accuracy of a `--exec_mode eval` run's line `full-prec eval: accuracy A | ...`."""
    for line in stdout.splitlines():
        if line.startswith("full-prec eval: accuracy "):
            return float(line.split()[3])
    raise RuntimeError("no accuracy line in the evaluation's output:\n%s" % stdout[-2000:])


def train_baseline(cache_dir, ratio, seed, budget):
    """Train (or find cached) one float baseline and evaluate it; returns its entry (also written as command.json)."""
    record_path = os.path.join(length_dir(cache_dir, ratio, seed), COMMAND)
    flags = train_flags(cache_dir, ratio, seed, budget)
    if os.path.exists(record_path):
        cached = publish.load_json(record_path)
        if cached.get("module", RUN_MODULE) != budget["module"]:  # caches written before the module was recorded
            raise publish.BenchmarkError("%s holds a float model of %s; expected one of %s (choose another "
                                         "--cache_dir)" % (record_path, cached.get("module", RUN_MODULE),
                                                           budget["module"]))
        if defining(cached.get("flags") or []) != defining(flags):
            raise publish.BenchmarkError("%s was trained with %s; expected %s (quick and full runs do not share a "
                                         "cache: choose another --cache_dir)" % (record_path, cached.get("flags"),
                                                                                 flags))
        return resolved(cached, length_dir(cache_dir, ratio, seed))
    argv = [sys.executable, "-m", budget["module"]] + flags
    seconds, log = stats.timed(lambda: _run(argv))
    with open(os.path.join(length_dir(cache_dir, ratio, seed), "train.log"), "w") as handle:
        handle.write(log)  # the run's own progress lines, kept with the checkpoint
    accuracy = parse_accuracy(_run(argv + ["--exec_mode=eval"]))
    entry = {"ratio": ratio, "seed": seed, "accuracy": accuracy, "seconds": seconds, "module": budget["module"],
             "checkpoint_prefix": checkpoint_prefix(cache_dir, ratio, seed), "flags": flags,
             "command": shlex.join(["python", "-m", budget["module"]] + flags),
             "settings_record": checkpoint_prefix(cache_dir, ratio, seed) + ".settings.json"}
    publish.write_json(record_path, entry)
    return entry


def choose_length(curve, threshold=THRESHOLD):
    """(chosen ratio, converged?) from {ratio: [accuracies over seeds]}: the first length whose next doubling adds
    less than `threshold` to the mean accuracy; the longest measured when none does."""
    ratios = sorted(curve)
    means = [sum(curve[r]) / len(curve[r]) for r in ratios]
    for index in range(len(ratios) - 1):
        if means[index + 1] - means[index] < threshold:
            return ratios[index], True
    return ratios[-1], False


def load_manifest(cache_dir):
    """The manifest of a baseline cache (checkpoint paths absolute); BenchmarkError when the directory holds none."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        raise publish.BenchmarkError("--baselines=%s holds no %s; expected a cache written by benchmarks.baselines"
                                     % (cache_dir, MANIFEST))
    manifest = publish.load_json(path)
    manifest["baselines"] = {seed: entry if os.path.isabs(entry["checkpoint_prefix"]) else
                             resolved(entry, length_dir(cache_dir, entry["ratio"], entry["seed"]))
                             for seed, entry in manifest.get("baselines", {}).items()}
    return manifest


def converge(cache_dir, seeds, budget, quick, store_dir=None, ratios=None):
    """Train (or find cached) the float models of `budget` at doubling lengths until converged; write and return
    the cache's manifest.

    Args:
      cache_dir: where checkpoints, settings, commands and the manifest are kept.
      seeds: the seeds trained at every length.
      budget: a budget like FULL (module, base_epochs, ratios, common).
      quick: recorded in the manifest (a quick cache is never a full one).
      store_dir: where finished runs are also kept (copied from there instead of trained; see the module's doc),
        with a manifest of its own; None: nowhere.
      ratios: the lengths to train, in this order, all of them (None: the budget's, stopping when converged);
        the budget's other lengths already finished for every seed join the curve.
    Returns:
      the manifest: the curve of mean accuracy against length, the chosen length, each seed's baseline entry.
    """
    os.makedirs(cache_dir, exist_ok=True)
    curve, entries = {}, []

    def measure(ratio):
        for seed in seeds:
            if store_dir:
                fetch_stored(store_dir, cache_dir, ratio, seed)
            entry = train_baseline(cache_dir, ratio, seed, budget)
            if store_dir:
                store_run(entry, cache_dir, store_dir)
            entries.append(entry)
            curve.setdefault(ratio, []).append(entry["accuracy"])
            print("ratio %g (%g epochs) seed %d: accuracy %.4f" % (ratio, budget["base_epochs"] * ratio, seed,
                                                                   entry["accuracy"]), flush=True)

    if ratios is not None:
        for ratio in budget["ratios"]:
            if ratio not in ratios and all(finished(cache_dir, ratio, seed) or
                                           (store_dir and finished(store_dir, ratio, seed)) for seed in seeds):
                measure(ratio)  # measured before: read, not trained
    for ratio in ratios if ratios is not None else budget["ratios"]:
        measure(ratio)
        chosen, converged = choose_length(curve)
        if converged and ratios is None:
            break
    chosen, converged = choose_length(curve)
    manifest = {"quick": quick, "seeds": seeds, "threshold": THRESHOLD, "chosen_ratio": chosen,
                "converged": converged, "module": budget["module"], "float_flags": ["--nb_epochs_rat=%g" % chosen],
                "float_common": list(budget["common"]),
                "curve": [{"ratio": r, "epochs": budget["base_epochs"] * r, "accuracies": curve[r],
                           "mean": stats.mean_std(curve[r])[0], "std": stats.mean_std(curve[r])[1]}
                          for r in sorted(curve)],
                "baselines": {str(e["seed"]): e for e in entries if e["ratio"] == chosen},
                "command": publish.command_line(), "machine": machine.machine_info(load=machine.read_load())}
    publish.write_json(os.path.join(cache_dir, MANIFEST), manifest)
    if store_dir:
        stored = {seed: publish.load_json(os.path.join(length_dir(store_dir, chosen, int(seed)), COMMAND))
                  for seed in manifest["baselines"]}
        publish.write_json(os.path.join(store_dir, MANIFEST), dict(manifest, baselines=stored))
    print("chosen: --nb_epochs_rat %g (%s)" % (chosen, "converged" if converged else "longest run; not converged"))
    return manifest


SECTION = "float_baselines"


def status_lines(store_dir, budget, seeds):
    """BENCHMARKS.md's section on the stored float references: every stored run by length, the convergence rule
    applied to the lengths every seed has finished, and what is still to train."""
    rows, curve, missing = [], {}, []
    for ratio in budget["ratios"]:
        records = {seed: publish.load_json(os.path.join(length_dir(store_dir, ratio, seed), COMMAND))
                   for seed in seeds if finished(store_dir, ratio, seed)}
        if len(records) == len(seeds):
            curve[ratio] = [records[seed]["accuracy"] for seed in seeds]
        missing += ["%g epochs seed %d" % (budget["base_epochs"] * ratio, seed) for seed in seeds
                    if seed not in records]
        if records:
            mean, std = stats.mean_std(r["accuracy"] for r in records.values())
            rows.append(["%g" % ratio, "%g" % (budget["base_epochs"] * ratio),
                         ", ".join("%d: %.2f" % (seed, 100 * r["accuracy"]) for seed, r in sorted(records.items())),
                         "%.2f" % (100 * mean) if std is None else "%.2f ± %.2f" % (100 * mean, 100 * std),
                         ", ".join("%.0f" % (r["seconds"] / 60) for _, r in sorted(records.items())),
                         "; ".join(sorted({r.get("stored", {}).get("date", "?")[:10] + " " +
                                           r.get("stored", {}).get("cpu", "?") for r in records.values()}))])
    lines = ["## Float references for the accuracy tables (issue 34; %s, Fashion-MNIST, all 10,000 test images)"
             % budget["module"].rsplit(".", 1)[-1], "",
             "Command: `.venv/bin/python -m benchmarks.baselines --cache_dir DIR --ratios R --seeds S` (trains what the "
             "store lacks, then copies each finished run into `%s`); this section: `.venv/bin/python -m "
             "benchmarks.baselines --status`." % os.path.relpath(STORE, publish.REPO_ROOT), "",
             "Every run is the model's standard schedule (cosine with warm-up) stretched to the length shown, from "
             "scratch, with %s. Training minutes are wall time on whatever else the machine ran (accuracy does not "
             "depend on it)." % " ".join(budget["common"]), ""]
    if rows:
        lines += [publish.markdown_table(["--nb_epochs_rat", "epochs", "test accuracy % by seed", "mean ± std",
                                          "training minutes", "stored (date, CPU)"], rows)]
    else:
        lines.append("No run stored yet.")
    lines.append("")
    if len(curve) >= 2:
        chosen, converged = choose_length(curve)
        lines.append("- Convergence rule (the first length whose doubling adds less than %.1f point, mean of seeds "
                     "%s): %s." % (100 * THRESHOLD, ",".join(str(s) for s in seeds),
                                   ("met at %g epochs" % (budget["base_epochs"] * chosen)) if converged else
                                   "not met yet (still rising at %g epochs)" % (budget["base_epochs"] * chosen)))
    else:
        lines.append("- Convergence rule (the first length whose doubling adds less than %.1f point, mean of seeds "
                     "%s): not decidable yet (fewer than two lengths finished for every seed)."
                     % (100 * THRESHOLD, ",".join(str(s) for s in seeds)))
    if missing:
        lines.append("- Still to train: %s." % ", ".join(missing))
    return lines


def parse_ratios(spec, budget):
    """Schedule lengths from a comma-separated list; each must be one of the budget's."""
    try:
        ratios = [float(part) for part in spec.split(",")]
    except ValueError:
        ratios = None
    if not ratios or any(ratio not in budget["ratios"] for ratio in ratios):
        raise publish.BenchmarkError("--ratios=%s is not valid; expected lengths among %s"
                                     % (spec, ",".join("%g" % r for r in budget["ratios"])))
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny subset and schedules (the test's smoke run)")
    parser.add_argument("--cache_dir", help="where checkpoints, settings and commands are kept (required to train)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--ratios", help="comma-separated schedule lengths to train, in this order (default: the "
                        "budget's doublings until converged)")
    parser.add_argument("--store", help="where finished runs are also kept (default for the full budget: %s; "
                        "'none': nowhere)" % os.path.relpath(STORE, publish.REPO_ROOT))
    parser.add_argument("--status", action="store_true", help="write BENCHMARKS.md's section on the stored runs "
                        "(nothing trained; --cache_dir not needed)")
    parser.add_argument("--markdown", default=publish.BENCHMARKS_MD, help="the file --status writes")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    store = args.store or (None if args.quick else STORE)
    if args.status:
        if store in (None, "none"):
            raise publish.BenchmarkError("--status needs a store; expected --store DIR")
        lines = status_lines(store, budget, accuracy_table.parse_seeds(args.seeds))
        publish.write_section(SECTION, "\n".join(lines) + "\n", args.markdown)
        print("\n".join(lines))
        return lines
    if not args.cache_dir:
        raise publish.BenchmarkError("--cache_dir is required to train; expected a directory for checkpoints")
    ratios = None if args.ratios is None else parse_ratios(args.ratios, budget)
    seeds = accuracy_table.parse_seeds(args.seeds)
    manifest = converge(args.cache_dir, seeds, budget, args.quick, store_dir=None if store == "none" else store,
                        ratios=ratios)
    if store not in (None, "none") and not args.quick:  # a quick run never touches BENCHMARKS.md
        publish.write_section(SECTION, "\n".join(status_lines(store, budget, seeds)) + "\n", args.markdown)
    return manifest


if __name__ == "__main__":
    publish.run_main(main)
