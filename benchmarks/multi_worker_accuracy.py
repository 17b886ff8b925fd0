"""Accuracy of 2 local workers against one worker with the same global batch and seed (issue 15's target).

For each model, the same run-script job (float training, then W4A4 channel-bucket fine-tuning) runs twice:
once as one process with --batch_size=B, once through tools/launch_workers.py as 2 workers with
--batch_size=B/2 each and --noenbl_lrn_rate_scaling, so both see the same global batches (the workers slice
one seeded global batch) at the same learning rate. The two differ only in where the sum of the gradients is
made and in batch-norm statistics averaged over two half batches. Target: float and quantized accuracy of
the 2-worker run within 0.3 points of the single run.

  .venv/bin/python -m benchmarks.multi_worker_accuracy            # full run, writes its BENCHMARKS.md section
  .venv/bin/python -m benchmarks.multi_worker_accuracy --quick --output /tmp/mw.json
"""
import argparse
import os
import subprocess
import sys

from benchmarks import machine, publish, stats

SECTION = "multi_worker_accuracy"
TARGET_POINTS = 0.3
MODELS = {"convnet": "nets/convnet_at_fmnist_run.py", "resnet20": "nets/resnet_at_fmnist_run.py"}
QUANT = ["--uql_weight_bits=4", "--uql_activation_bits=4", "--uql_use_buckets", "--uql_bucket_type=channel"]
FULL = {"global_batch": 128, "nb_epochs_rat": 0.3334, "uql_quant_epochs": 1.0,  # 1 float epoch (base 3), 1 fine-tuning
        "extra": ["--batch_size_eval=500", "--summ_step=100"]}
QUICK = {"global_batch": 32, "nb_epochs_rat": 0.02, "uql_quant_epochs": 0.25,
         "extra": ["--batch_size_eval=100", "--summ_step=4", "--train_subset=256", "--eval_subset=200"]}


def job_flags(run_dir, budget, nb_workers, seed):
    """The run-script flags of one job: per-worker batch = global batch / nb_workers."""
    return (["--learner=uniform", "--seed=%d" % seed, "--batch_size=%d" % (budget["global_batch"] // nb_workers),
             "--nb_epochs_rat=%s" % budget["nb_epochs_rat"], "--uql_quant_epochs=%s" % budget["uql_quant_epochs"],
             "--save_path=%s/float/model.ckpt" % run_dir, "--uql_save_quant_model_path=%s/quant/model.ckpt" % run_dir,
             "--log_dir=%s/logs" % run_dir] + (["--noenbl_lrn_rate_scaling"] if nb_workers > 1 else [])
            + budget["extra"] + QUANT)


def run_job(work_dir, model, budget, nb_workers, seed):
    """Run one job to the end; returns its results.json with the wall time."""
    run_dir = os.path.join(work_dir, "seed%d" % seed, "%s_%dworker" % (model, nb_workers))
    script = MODELS[model]
    flags = job_flags(run_dir, budget, nb_workers, seed)
    if nb_workers > 1:
        argv = [sys.executable, "tools/launch_workers.py", script, "--nb_workers", str(nb_workers)] + flags
    else:
        argv = [sys.executable, script] + flags
    seconds, done = stats.timed(lambda: subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True))
    if done.returncode != 0:
        raise publish.BenchmarkError("%s with %d worker(s) failed: %s" % (
            model, nb_workers, (done.stderr.strip().splitlines() or ["no output"])[-1]))
    results = publish.load_json(os.path.join(run_dir, "quant", "results.json"))
    in_sync = nb_workers == 1 or "workers in sync" in done.stdout + done.stderr
    if not in_sync:
        raise publish.BenchmarkError("%s with %d workers ended without the workers' 'workers in sync' check"
                                     % (model, nb_workers))
    return {"float_accuracy": results["float_accuracy"], "quant_accuracy": results["quant_accuracy"],
            "test_examples": results["test_examples"], "seconds": seconds, "workers_in_sync": in_sync}


def compare(single, multi):
    """Differences in points (2 workers - 1 worker) and whether each is within the target."""
    out = {}
    for key in ("float_accuracy", "quant_accuracy"):
        points = 100.0 * (multi[key] - single[key])
        out[key] = {"points": points, "met": abs(points) <= TARGET_POINTS}
    return out


def render(payload):
    lines = ["## Multi-worker accuracy (2 local workers vs one, Fashion-MNIST, all test images)", "",
             "Command: `%s`" % payload["command"], ""] + machine.machine_lines(payload["machine"],
                                                                             payload["load_before"]) + [
        "- Same job both ways: float training (nb_epochs_rat %s), then W4A4 channel-bucket fine-tuning (%s epochs); "
        "global batch %d (2 workers: %d each, learning-rate scaling off), seed %d. Target: |2 workers - 1| <= %.1f "
        "points." % (payload["budget"]["nb_epochs_rat"], payload["budget"]["uql_quant_epochs"],
                     payload["budget"]["global_batch"], payload["budget"]["global_batch"] // 2, payload["seed"],
                     TARGET_POINTS), ""]
    rows = []
    for model, entry in payload["models"].items():
        one, two, diff = entry["1"], entry["2"], entry["difference"]
        for key, label in (("float_accuracy", "float"), ("quant_accuracy", "W4A4")):
            rows.append((model, label, "%.2f" % (100 * one[key]), "%.2f" % (100 * two[key]),
                         "%+.2f" % diff[key]["points"], "yes" if diff[key]["met"] else "**no**"))
        rows.append((model, "wall time", "%.0f s" % one["seconds"], "%.0f s" % two["seconds"], "", ""))
    lines.append(publish.markdown_table(("model", "accuracy %", "1 worker", "2 workers", "difference (points)",
                                         "within target"), rows))
    lines += ["", "2 workers on 2 cores share the same CPUs, so the wall time is no speed-up figure (see the "
              "all-reduce section for the step-time model)."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser, render_json=False)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of %s" % ", ".join(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="/tmp/tfquant_multi_worker", help="checkpoints and logs")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise publish.BenchmarkError("--models=%s is not valid; expected a comma-separated subset of %s"
                                     % (args.models, ", ".join(MODELS)))
    budget = QUICK if args.quick else FULL
    load_before = publish.start(args)
    results = {}
    for model in models:
        entry = {str(n): run_job(args.work_dir, model, budget, n, args.seed) for n in (1, 2)}
        entry["difference"] = compare(entry["1"], entry["2"])
        results[model] = entry
        print("%s: float %.4f vs %.4f, W4A4 %.4f vs %.4f (1 vs 2 workers)" % (
            model, entry["1"]["float_accuracy"], entry["2"]["float_accuracy"], entry["1"]["quant_accuracy"],
            entry["2"]["quant_accuracy"]), flush=True)
    end_info = machine.machine_info(load=machine.end_load(args.quick))
    payload = {"quick": args.quick, "budget": budget, "seed": args.seed, "models": results,
               "machine": end_info, "load_before": load_before, "command": publish.command_line()}
    publish.write_json(publish.results_path(args, SECTION), payload)
    if not args.quick:
        publish.publish(SECTION, render(payload), args.markdown, load_before, payload["machine"]["load_average"],
                        args.allow_busy)
    return payload


if __name__ == "__main__":
    publish.run_main(main)
