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
"""
import argparse
import os
import shlex
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


def _run(argv):
    done = subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError("%s failed:\n%s" % (shlex.join(argv), done.stderr[-3000:]))
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
        if cached.get("flags") != flags:
            raise publish.BenchmarkError("%s was trained with %s; expected %s (quick and full runs do not share a "
                                         "cache: choose another --cache_dir)" % (record_path, cached.get("flags"),
                                                                                 flags))
        return cached
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
    """The manifest of a baseline cache; BenchmarkError when the directory holds none."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        raise publish.BenchmarkError("--baselines=%s holds no %s; expected a cache written by benchmarks.baselines"
                                     % (cache_dir, MANIFEST))
    return publish.load_json(path)


def converge(cache_dir, seeds, budget, quick):
    """Train (or find cached) the float models of `budget` at doubling lengths until converged; write and return
    the cache's manifest.

    Args:
      cache_dir: where checkpoints, settings, commands and the manifest are kept.
      seeds: the seeds trained at every length.
      budget: a budget like FULL (module, base_epochs, ratios, common).
      quick: recorded in the manifest (a quick cache is never a full one).
    Returns:
      the manifest: the curve of mean accuracy against length, the chosen length, each seed's baseline entry.
    """
    os.makedirs(cache_dir, exist_ok=True)
    curve, entries, chosen, converged = {}, [], None, False
    for ratio in budget["ratios"]:
        for seed in seeds:
            entry = train_baseline(cache_dir, ratio, seed, budget)
            entries.append(entry)
            curve.setdefault(ratio, []).append(entry["accuracy"])
            print("ratio %g (%g epochs) seed %d: accuracy %.4f" % (ratio, budget["base_epochs"] * ratio, seed,
                                                                   entry["accuracy"]), flush=True)
        chosen, converged = choose_length(curve)
        if converged:
            break
    manifest = {"quick": quick, "seeds": seeds, "threshold": THRESHOLD, "chosen_ratio": chosen,
                "converged": converged, "module": budget["module"], "float_flags": ["--nb_epochs_rat=%g" % chosen],
                "float_common": list(budget["common"]),
                "curve": [{"ratio": r, "epochs": budget["base_epochs"] * r, "accuracies": curve[r],
                           "mean": stats.mean_std(curve[r])[0], "std": stats.mean_std(curve[r])[1]}
                          for r in sorted(curve)],
                "baselines": {str(e["seed"]): e for e in entries if e["ratio"] == chosen},
                "command": publish.command_line(), "machine": machine.machine_info(load=machine.read_load())}
    publish.write_json(os.path.join(cache_dir, MANIFEST), manifest)
    print("chosen: --nb_epochs_rat %g (%s)" % (chosen, "converged" if converged else "longest run; not converged"))
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny subset and schedules (the test's smoke run)")
    parser.add_argument("--cache_dir", required=True, help="where checkpoints, settings and commands are kept")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    args = parser.parse_args(argv)
    return converge(args.cache_dir, accuracy_table.parse_seeds(args.seeds), QUICK if args.quick else FULL,
                    args.quick)


if __name__ == "__main__":
    publish.run_main(main)
