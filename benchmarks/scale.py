"""Scale benchmark: ResNet-50, MobileNetV2 (224x224, ILSVRC-12 records) and the Transformer at batch 32.

For each model and mode (float, tfquant W4A4 with channel buckets, W8A8) one subprocess imports TensorFlow,
builds the float forward graph on its input pipeline (timed: "build"), rewrites it with quantize_graph
(timed), adds the loss and optimizer, starts a session and initialises the variables (timed: "session
start"), runs warm-up steps and then timed training steps (median), and reports its peak RSS (ru_maxrss).
The ILSVRC-12 models read generated records (tools/make_ilsvrc12_records.py, JPEGs of 256..400 pixels, so
decoding and cropping are part of the step, as on real data); the Transformer reads Fashion-MNIST.

  .venv/bin/python -m benchmarks.scale                 # full run (quiet machine), writes its BENCHMARKS.md section
  .venv/bin/python -m benchmarks.scale --quick --output /tmp/scale.json   # tiny sizes, one process per model

--quick uses 32x32 images, batch 4, ResNet-18 in place of ResNet-50, MobileNetV2 x0.35, and measures the
three modes of a model one after another in one process (its RSS figures then are not per mode).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks import machine, publish, stats

SECTION = "scale"
# w4a4-channel-recompute-weights is W4A4 as the ILSVRC-12 run scripts train it (their --uql_recompute_quantized
# default), the modes beside it what a user gets with the other settings.
MODES = ("float", "w4a4-channel", "w8a8", "w4a4-channel-recompute-weights", "w4a4-channel-recompute")
MODELS = ("resnet_50", "mobilenet_v2", "transformer")
RESNET_SCRIPT_MODE = "w4a4-channel-recompute"  # learners.flags.SCRIPT_DEFAULTS["resnet_at_ilsvrc12"]
RESULT_PREFIX = "SCALE_RESULT "
TARGETS = {"quantize_over_build": 0.5, "step_ratio": 1.10, "rss_ratio": 1.15}


def _quant_config(mode):
    import tfquant  # pylint: disable=import-outside-toplevel
    if mode == "float":
        return None
    if mode.startswith("w4a4-channel"):
        # The recompute modes rebuild the quantized weights (and activations) in the backward pass (less memory,
        # more work).
        recompute = {"w4a4-channel": "none", "w4a4-channel-recompute-weights": "weights",
                     "w4a4-channel-recompute": "all"}[mode]
        return tfquant.QuantConfig(weight_bits=4, activation_bits=4, use_buckets=True, bucket_type="channel",
                                   recompute_quantized=recompute)
    return tfquant.QuantConfig(weight_bits=8, activation_bits=8)


def _helper(model, data_dir, image_size, batch_size, quick):
    if model == "transformer":
        from nets import transformer_at_fmnist  # pylint: disable=import-outside-toplevel
        return transformer_at_fmnist.ModelHelper(batch_size=batch_size, seed=0)
    if model == "mobilenet_v2":
        from nets import mobilenet_at_ilsvrc12  # pylint: disable=import-outside-toplevel
        return mobilenet_at_ilsvrc12.ModelHelper(data_dir, mobilenet_version=2,
                                                 mobilenet_depth_mult=0.35 if quick else 1.0,
                                                 image_size=image_size, batch_size=batch_size, seed=0)
    from nets import resnet_at_ilsvrc12  # pylint: disable=import-outside-toplevel
    return resnet_at_ilsvrc12.ModelHelper(data_dir, resnet_size=18 if quick else 50, image_size=image_size,
                                          batch_size=batch_size, seed=0)


def measure(helper, mode, warmup, steps):
    """Build, rewrite, start and train one model in a new graph; returns its timings (seconds)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tfquant  # pylint: disable=import-outside-toplevel
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(0)
        start = time.perf_counter()
        images, labels = helper.build_dataset_train()
        logits = helper.forward_train(images)
        build = time.perf_counter() - start
        config = _quant_config(mode)
        quantize = 0.0
        if config is not None:
            start = time.perf_counter()
            report = tfquant.quantize_graph(graph, config, is_training=True)
            quantize = time.perf_counter() - start
            logits = report.output(logits)
        loss, _ = helper.calc_loss(labels, logits, tf1.trainable_variables())
        step = tf1.train.get_or_create_global_step()
        with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
            train_op = tf1.train.MomentumOptimizer(0.01, 0.9).minimize(loss, global_step=step)
        init = tf1.global_variables_initializer()
        ops = len(graph.get_operations())
    start = time.perf_counter()
    config_proto = tf1.ConfigProto(intra_op_parallelism_threads=0, inter_op_parallelism_threads=2)
    with tf1.Session(graph=graph, config=config_proto) as sess:
        sess.run(init)
        session_start = time.perf_counter() - start
        for _ in range(warmup):
            sess.run(train_op)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            sess.run(train_op)
            times.append(time.perf_counter() - start)
    return {"mode": mode, "build_s": build, "quantize_s": quantize, "session_start_s": session_start,
            "step_s": stats.median(times), "step_times_s": times, "graph_ops": ops}


def worker(args):
    """Runs in the subprocess: measure args.worker_model in args.worker_modes; prints one JSON line per mode."""
    modes = args.worker_modes.split(",")
    helper = _helper(args.worker_model, args.data_dir, args.image_size, args.batch_size, args.quick)
    for mode in modes:
        result = measure(helper, mode, args.warmup, args.steps)
        # Linux reports ru_maxrss in KiB.
        result.update(model=args.worker_model, network=helper.model_name,
                      peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(args, model, modes):
    command = [sys.executable, "-m", "benchmarks.scale", "--worker_model", model, "--worker_modes", ",".join(modes),
               "--data_dir", args.data_dir, "--image_size", str(args.image_size), "--batch_size",
               str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.quick:
        command.append("--quick")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(command, cwd=publish.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env)
    if done.returncode != 0:
        raise RuntimeError("scale worker %s %s failed (exit %d):\n%s" % (model, modes, done.returncode,
                                                                          done.stderr[-3000:]))
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in done.stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    if len(results) != len(modes):
        raise RuntimeError("scale worker %s printed %d results for %d modes" % (model, len(results), len(modes)))
    return results


def summarize(runs, quick):
    """{model: {mode: medians}} and the ratios against float of each model."""
    summary, ratios = {}, {}
    for model in MODELS:
        summary[model] = {}
        for mode in MODES:
            mine = [r for r in runs if r["model"] == model and r["mode"] == mode]
            summary[model][mode] = {key: stats.median(r[key] for r in mine)
                                    for key in ("build_s", "quantize_s", "session_start_s", "step_s", "peak_rss_kb")}
            summary[model][mode]["graph_ops"] = mine[0]["graph_ops"]
        base = summary[model]["float"]
        ratios[model] = {}
        for mode in MODES[1:]:
            entry = summary[model][mode]
            ratios[model][mode] = {"quantize_over_build": entry["quantize_s"] / base["build_s"],
                                   "step_ratio": entry["step_s"] / base["step_s"],
                                   "rss_ratio": None if quick else entry["peak_rss_kb"] / base["peak_rss_kb"]}
    return summary, ratios


def render(args, summary, ratios, info, load_before, command):
    """The BENCHMARKS.md section."""
    lines = ["## Scale: ResNet-50, MobileNetV2 at %dx%d and the Transformer, batch %d"
             % (args.image_size, args.image_size, args.batch_size), "", "Command: `%s`" % command, ""]
    lines.extend(machine.machine_lines(info, load_before))
    lines.extend(["- One subprocess per model and mode, %d runs each, medians; %d warm-up steps, then the median "
                  "of %d timed steps. ILSVRC-12 models read generated records (JPEG decoding and cropping are in "
                  "the step); the Transformer reads Fashion-MNIST (28x28)." % (args.repeats, args.warmup, args.steps),
                  ""])
    rows = []
    for model in MODELS:
        for mode in MODES:
            entry = summary[model][mode]
            ratio = ratios[model].get(mode, {})
            rows.append((model, "`%s`" % mode, entry["graph_ops"], "%.2f" % entry["build_s"],
                         "%.2f" % entry["quantize_s"], "%.2f" % entry["session_start_s"],
                         "%.0f" % (1000 * entry["step_s"]), "%.0f" % (entry["peak_rss_kb"] / 1024.0),
                         "%.3f" % ratio["step_ratio"] if ratio else "-",
                         "%.3f" % ratio["rss_ratio"] if ratio and ratio["rss_ratio"] else "-"))
    lines.append(publish.markdown_table(
        ["model", "mode", "graph ops", "build float graph (s)", "quantize_graph (s)", "session start (s)",
         "step (ms)", "peak RSS (MiB)", "step / float", "peak RSS / float"], rows))
    # The target is judged as resnet_at_ilsvrc12_run.py trains W4A4 (its --uql_recompute_quantized default: all).
    resnet = ratios["resnet_50"][RESNET_SCRIPT_MODE]
    lines.extend(["", "- Targets (ResNet-50, W4A4 channel as `nets/resnet_at_ilsvrc12_run.py` trains it, "
                  "`--uql_recompute_quantized all`: `%s`): quantize_graph %.2f x the float graph build (<= %.2f), "
                  "step %.3f x float (<= %.2f), peak RSS %.3f x float (<= %.2f)."
                  % (RESNET_SCRIPT_MODE, resnet["quantize_over_build"], TARGETS["quantize_over_build"],
                     resnet["step_ratio"], TARGETS["step_ratio"], resnet["rss_ratio"] or float("nan"),
                     TARGETS["rss_ratio"])]
                 + ["- The same with %s (`%s`): step %.3f x float, peak RSS %.3f x float."
                    % (text, mode, ratios["resnet_50"][mode]["step_ratio"],
                       ratios["resnet_50"][mode]["rss_ratio"] or float("nan"))
                    for mode, text in (("w4a4-channel", "nothing rebuilt (`--uql_recompute_quantized none`, the "
                                                        "other scripts' default)"),
                                       ("w4a4-channel-recompute-weights", "only the weights rebuilt"))])
    return "\n".join(lines)


def make_records(args):
    """Generated ILSVRC-12 records for the image size (a temporary directory unless --data_dir is given)."""
    from tools import make_ilsvrc12_records  # pylint: disable=import-outside-toplevel
    if args.data_dir:
        return args.data_dir
    directory = tempfile.mkdtemp(prefix="tfquant-scale-")
    low = max(args.image_size, 24)
    count = max(4 * args.batch_size, 16)
    make_ilsvrc12_records.make_records(directory, nb_train=count, nb_eval=8, nb_files=4, min_size=low,
                                       max_size=int(low * 1.6), bboxes=True, seed=0)
    return directory


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser, render_json=False)
    parser.add_argument("--image_size", type=int, default=None, help="default 224 (32 with --quick)")
    parser.add_argument("--batch_size", type=int, default=None, help="default 32 (4 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; 1 quick)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per model and mode (default 2; 1 quick)")
    parser.add_argument("--data_dir", default=None, help="ILSVRC-12 records to read (default: generated)")
    parser.add_argument("--worker_model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--worker_modes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.image_size = args.image_size or (32 if quick else 224)
    args.batch_size = args.batch_size or (4 if quick else 32)
    args.steps = args.steps or (2 if quick else 10)
    args.warmup = args.warmup or (1 if quick else 3)
    args.repeats = args.repeats or (1 if quick else 2)
    if args.worker_model:
        sys.path.insert(0, publish.REPO_ROOT)
        worker(args)
        return None
    load_before = publish.start(args)
    args.data_dir = make_records(args)
    runs = []
    for repeat in range(args.repeats):
        for model in MODELS:
            groups = [MODES] if quick else [[mode] for mode in MODES]
            for modes in groups:
                for result in run_worker(args, model, modes):
                    runs.append(result)
                    print("[scale] run %d %s (%s) %s: build %.2f s, quantize %.2f s, session %.2f s, step %.0f ms, "
                          "peak %.0f MiB" % (repeat + 1, model, result["network"], result["mode"],
                                             result["build_s"], result["quantize_s"], result["session_start_s"],
                                             1000 * result["step_s"], result["peak_rss_kb"] / 1024.0), flush=True)
    summary, ratios = summarize(runs, quick)
    info = machine.machine_info(load=machine.end_load(quick))
    payload = {"benchmark": SECTION, "quick": quick, "modes": list(MODES), "models": list(MODELS),
               "summary": summary, "ratios": ratios, "runs": runs, "targets": TARGETS, "machine": info,
               "load_before": load_before, "command": publish.command_line(), "args": vars(args)}
    publish.write_json(publish.results_path(args, SECTION), payload)
    if not quick:
        publish.publish(SECTION, render(args, summary, ratios, info, load_before, payload["command"]),
                        args.markdown, load_before, info["load_average"], args.allow_busy)
        print("[scale] wrote section %s of %s" % (SECTION, args.markdown), flush=True)
    return payload


if __name__ == "__main__":
    publish.run_main(main)
