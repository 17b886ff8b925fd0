"""Peak resident memory of ResNet training quantized by tfquant (W4A4, channel buckets) vs float.

Each measurement runs in its own subprocess so peaks never mix: the worker imports TensorFlow, builds
the training graph and session, initialises variables (RSS noted: TensorFlow's baseline plus the
graph and variables), then runs N training steps and reports the peak RSS (getrusage ru_maxrss).
Float and quantized workers alternate, and each is repeated; medians are reported.

  .venv/bin/python -m benchmarks.memory            # full run, writes its BENCHMARKS.md section
  .venv/bin/python -m benchmarks.memory --quick --output /tmp/memory.json
"""
import argparse
import json
import resource
import subprocess
import sys

from benchmarks import graphs, machine, publish, stats

SECTION = "memory"
FLOAT = "float"
QUANT = "w4a4-channel"
PEER = "peer-fused-w4a4"
MODES = (FLOAT, QUANT, PEER)
RATIO_TARGET = 1.15
RESULT_PREFIX = "MEMORY_RESULT "


def _maxrss_kb():
    # Linux reports ru_maxrss in KiB (macOS in bytes; this benchmark targets Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kb():
    """Resident set size now, in KiB (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _quantized_activation_kb(graph):
    """Size of one float copy of every activation whose readers were moved onto a quantized version.

    Both the activation (for its own gradient, e.g. ReluGrad) and its quantized copy (for the next
    layer's weight gradient) stay alive until the backward pass, so this is the memory expected on top
    of float training.
    """
    total = 0
    for op in graph.get_operations():
        if op.type != "Relu":
            continue
        output = op.outputs[0]
        readers = [c for c in output.consumers() if not c.name.startswith("gradients")]
        if readers and all("act_quant" in c.name for c in readers):
            total += output.shape.num_elements() * output.dtype.size
    return total / 1024.0


def worker(mode, resnet_size, batch_size, steps):
    """Runs in the subprocess: measure one mode and print its figures as one JSON line."""
    rss = {"after_import_kb": current_rss_kb()}
    quant = {FLOAT: None, QUANT: graphs.tfquant_config(4, 4, "channel"), PEER: ("peer", 4, 4)}[mode]
    graph = graphs.TrainGraph(resnet_size, batch_size, quant).start()
    rss["quantized_activation_kb"] = _quantized_activation_kb(graph.graph)
    rss["after_build_kb"] = current_rss_kb()
    rss["peak_after_build_kb"] = _maxrss_kb()
    for _ in range(steps):
        graph.step()
    rss["after_steps_kb"] = current_rss_kb()
    rss["peak_kb"] = _maxrss_kb()
    rss["graph_ops"] = len(graph.graph.get_operations())
    graph.close()
    print(RESULT_PREFIX + json.dumps(dict(rss, mode=mode)), flush=True)


def run_worker(mode, args):
    command = [sys.executable, "-m", "benchmarks.memory", "--worker", mode, "--resnet_size", str(args.resnet_size),
               "--batch_size", str(args.batch_size), "--steps", str(args.steps)]
    done = subprocess.run(command, cwd=publish.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    if done.returncode != 0:
        raise RuntimeError("memory worker %s failed (exit %d):\n%s" % (mode, done.returncode, done.stderr[-3000:]))
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError("memory worker %s printed no result; stdout:\n%s" % (mode, done.stdout[-3000:]))


def summarize(runs):
    summary = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        entry = {key: stats.median(r[key] for r in mine)
                 for key in ("after_import_kb", "after_build_kb", "peak_after_build_kb", "after_steps_kb", "peak_kb")}
        entry["training_increase_kb"] = entry["peak_kb"] - entry["after_build_kb"]
        entry["graph_ops"] = mine[0]["graph_ops"]
        entry["quantized_activation_kb"] = mine[0]["quantized_activation_kb"]
        entry["runs"] = len(mine)
        summary[mode] = entry
    base, quant = summary[FLOAT], summary[QUANT]
    ratios = {"peak": quant["peak_kb"] / base["peak_kb"],
              "after_build": quant["after_build_kb"] / base["after_build_kb"],
              "peer_peak": summary[PEER]["peak_kb"] / base["peak_kb"]}
    if base["training_increase_kb"] > 0:
        ratios["training_increase"] = quant["training_increase_kb"] / base["training_increase_kb"]
    return summary, ratios


def render(args, summary, ratios, info, load_before, command):
    def mib(kb):
        return "%.0f" % (kb / 1024.0)

    lines = ["## Peak memory of quantized training (ResNet-%d, batch %d)" % (args.resnet_size, args.batch_size), "",
             "Command: `%s`" % command, ""]
    lines.extend(machine.machine_lines(info, load_before, graphs.INTRA_OP_THREADS))
    lines.extend([
        "- One subprocess per figure: import TensorFlow, build the training graph and session, initialise, "
        "run %d steps. RSS = VmRSS; peak = ru_maxrss. Modes alternate, %d runs each; medians shown."
        % (args.steps, args.repeats),
        "- Quantized: tfquant W4A4, channel buckets, first and last layer float, 'ema' ranges. Peer: "
        "TensorFlow's fused fake-quant ops (as in the training-overhead section).", ""])
    rows = []
    for mode in MODES:
        e = summary[mode]
        rows.append(("`%s`" % mode, e["graph_ops"], mib(e["after_import_kb"]), mib(e["after_build_kb"]),
                     mib(e["peak_kb"]), mib(e["training_increase_kb"]),
                     "%.3f" % (e["peak_kb"] / summary[FLOAT]["peak_kb"]),
                     mib(e["quantized_activation_kb"])))
    lines.append(publish.markdown_table(
        ["mode", "graph ops", "RSS after importing TF (MiB)", "RSS after build + init (MiB)",
         "peak RSS after training (MiB)", "peak - RSS after build (MiB)", "peak / float peak",
         "one float copy of the quantized activations (MiB)"], rows))
    lines.extend(["",
                  "- Peak RSS ratio quantized / float: **%.3f** (target <= %.2f): %s."
                  % (ratios["peak"], RATIO_TARGET, "met" if ratios["peak"] <= RATIO_TARGET else "**not met**"),
                  "- RSS after build ratio: %.3f (TensorFlow's baseline and the graph, before any step)."
                  % ratios["after_build"]])
    if "training_increase" in ratios:
        lines.append("- Memory added by training (peak - RSS after build) ratio: %.3f; the fixed TensorFlow "
                     "baseline dilutes this in the peak ratio." % ratios["training_increase"])
    quant, peer, base = summary[QUANT], summary[PEER], summary[FLOAT]
    lines.append("- Fused fake-quant peer: peak ratio %.3f." % ratios["peer_peak"])
    lines.append("- Training adds %s MiB more than float with tfquant and %s MiB more with the peer; one float "
                 "copy of the quantized activations is %s MiB (the Relu output and its quantized copy both "
                 "live until the backward pass). Before any step tfquant's graph costs %s MiB more than float "
                 "(%d more ops), the peer's %s MiB (%d more ops)."
                 % (mib(quant["training_increase_kb"] - base["training_increase_kb"]),
                    mib(peer["training_increase_kb"] - base["training_increase_kb"]),
                    mib(quant["quantized_activation_kb"]),
                    mib(quant["after_build_kb"] - base["after_build_kb"]), quant["graph_ops"] - base["graph_ops"],
                    mib(peer["after_build_kb"] - base["after_build_kb"]), peer["graph_ops"] - base["graph_ops"]))
    return "\n".join(lines)


def rerender(path, markdown, allow_busy=False):
    payload = publish.load_full_run(path)
    args = argparse.Namespace(**payload["args"])
    body = render(args, payload["modes"], payload["ratios"], payload["machine"], payload["load_before"],
                  payload["command"])
    publish.publish(SECTION, body, markdown, payload["load_before"], payload["machine"]["load_average"], allow_busy)
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser)
    parser.add_argument("--resnet_size", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=None, help="default 128 (8 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 10; 2 quick)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per mode (default 2; 1 quick)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render_json:
        return rerender(args.render_json, args.markdown, args.allow_busy)
    quick = args.quick
    args.batch_size = args.batch_size or (8 if quick else 128)
    args.steps = args.steps or (2 if quick else 10)
    args.repeats = args.repeats or (1 if quick else 2)
    if args.worker:
        worker(args.worker, args.resnet_size, args.batch_size, args.steps)
        return None

    def log(message):
        print("[memory] " + message, flush=True)

    load_before = publish.start(args)
    runs = []
    for repeat in range(args.repeats):
        for mode in MODES:
            result = run_worker(mode, args)
            runs.append(result)
            log("run %d %s: after build %.0f MiB, peak %.0f MiB"
                % (repeat + 1, mode, result["after_build_kb"] / 1024.0, result["peak_kb"] / 1024.0))
    summary, ratios = summarize(runs)
    info = machine.machine_info(load=machine.end_load(args.quick))
    log("peak ratio %.3f (target <= %.2f); after-build ratio %.3f; training-increase ratio %s"
        % (ratios["peak"], RATIO_TARGET, ratios["after_build"],
           "%.3f" % ratios["training_increase"] if "training_increase" in ratios else "n/a"))
    payload = {"benchmark": SECTION, "quick": quick, "resnet_size": args.resnet_size,
               "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
               "float_mode": FLOAT, "modes": summary, "ratios": ratios, "runs": runs,
               "ratio_target": RATIO_TARGET, "machine": info, "load_before": load_before,
               "command": publish.command_line(), "args": vars(args)}
    publish.write_json(publish.results_path(args, SECTION), payload)
    if not quick:
        publish.publish(SECTION, render(args, summary, ratios, info, load_before, payload["command"]),
                        args.markdown, load_before, info["load_average"], args.allow_busy)
        log("wrote section %s of %s" % (SECTION, args.markdown))
    return payload


if __name__ == "__main__":
    publish.run_main(main)
