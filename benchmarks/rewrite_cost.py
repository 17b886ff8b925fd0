"""Time of tfquant.quantize_graph on ResNet training graphs of growing depth (W4A4, channel buckets).

Each repetition builds a fresh graph (forward pass + loss, no gradients yet) and times only the
quantize_graph call. Reported per depth: ops in the graph before the call, the median seconds, and
ops per second; a roughly constant ops/s means the rewrite cost grows linearly with the graph.
Both wall-clock and process CPU time are recorded: the rewrite is single-threaded Python, so on a
machine shared with other jobs its CPU time is the steadier figure of its own cost.

  .venv/bin/python -m benchmarks.rewrite_cost            # full run, writes its BENCHMARKS.md section
  .venv/bin/python -m benchmarks.rewrite_cost --quick --output /tmp/rewrite.json
"""
import argparse
import collections
import cProfile
import gc
import os
import pstats
import time

import tfquant
from benchmarks import graphs, machine, publish, stats

SECTION = "rewrite_cost"
SIZES = (20, 56, 110)
QUICK_SIZES = (20, 32)
TIME_TARGET_S = 1.0  # for the largest network
# ops/s of the largest and smallest network within this factor counts as linear growth.
LINEAR_TOLERANCE = 1.5


def measure(resnet_size, batch_size, repeats, config, log):
    seconds, cpu_seconds, ops_before, ops_after, layers = [], [], None, None, None
    for _ in range(repeats):
        graph, ops_before = graphs.build_loss_graph(resnet_size, batch_size)
        gc.collect()
        # gc off so a collection of the previous graph's garbage is not billed to the rewrite.
        gc.disable()
        try:
            cpu_start = time.process_time()
            elapsed, report = stats.timed(lambda: tfquant.quantize_graph(graph, config, is_training=True))
            cpu_seconds.append(time.process_time() - cpu_start)
        finally:
            gc.enable()
        seconds.append(elapsed)
        ops_after = len(graph.get_operations())
        layers = sum(1 for layer in report.layers if layer.quantized)
        del graph, report
    med, cpu_med = stats.median(seconds), stats.median(cpu_seconds)
    log("ResNet-%d: %d ops, median %.3f s wall, %.3f s CPU over %d graphs (wall %s)"
        % (resnet_size, ops_before, med, cpu_med, repeats, ", ".join("%.3f" % s for s in seconds)))
    return {"resnet_size": resnet_size, "ops_before": ops_before, "ops_after": ops_after,
            "quantized_layers": layers, "median_s": med, "times_s": seconds, "ops_per_s": ops_before / med,
            "median_cpu_s": cpu_med, "cpu_times_s": cpu_seconds, "ops_per_cpu_s": ops_before / cpu_med}


def render(args, rows, linear, info, load_before, profile_data, batch_row, command):
    largest = rows[-1]
    lines = ["## Rewrite cost of `tfquant.quantize_graph`", "",
             "Command: `%s`" % command, ""]
    lines.extend(machine.machine_lines(info, load_before))
    lines.extend([
        "- Graph: ResNet forward pass (training mode) and loss, batch %d held in the graph, no gradients yet; "
        "W4A4, channel buckets, first and last layer float, 'ema' activation ranges." % args.batch_size,
        "- Timed: the `quantize_graph` call alone (garbage collector paused), median over %d fresh graphs "
        "per depth, wall-clock and process CPU time." % args.repeats,
        ""])
    table = [("ResNet-%d" % r["resnet_size"], r["ops_before"], r["ops_after"], r["ops_after"] - r["ops_before"],
              r["quantized_layers"], "%.3f" % r["median_s"], "%.0f" % r["ops_per_s"],
              "%.3f" % r["median_cpu_s"], "%.0f" % r["ops_per_cpu_s"],
              "%.0f" % (1e6 * r["median_cpu_s"] / (r["ops_after"] - r["ops_before"]))) for r in rows]
    lines.append(publish.markdown_table(
        ["network", "ops before", "ops after", "ops added", "layers quantized", "median wall s",
         "ops/s (wall)", "median CPU s", "ops/s (CPU)", "CPU µs per added op"], table))
    lines.extend(["",
                  "- Linear growth: ops/s (CPU) of the largest and smallest network differ by a factor of %.2f "
                  "(wall: %.2f; tolerance %.1f): %s."
                  % (linear["spread"], linear["spread_wall"], LINEAR_TOLERANCE,
                     "met" if linear["ok"] else "**not met**"),
                  "- ResNet-%d rewrite: %.3f s wall, %.3f s CPU (target < %.1f s): %s."
                  % (largest["resnet_size"], largest["median_s"], largest["median_cpu_s"], TIME_TARGET_S,
                     verdict(largest))])
    if profile_data:
        lines.extend(breakdown_lines(profile_data, rows, batch_row))
    return "\n".join(lines)


def verdict(row):
    if row["median_s"] < TIME_TARGET_S:
        return "met"
    if row["median_cpu_s"] < TIME_TARGET_S:
        return "met in CPU time, missed in wall time (machine shared with other jobs)"
    return "**not met**"


def breakdown(resnet_size, batch_size, config):
    """Where one rewrite's time goes (cProfile) and which op types it adds."""
    graph, _ = graphs.build_loss_graph(resnet_size, batch_size)
    before = collections.Counter(op.type for op in graph.get_operations())
    profiler = cProfile.Profile()
    profiler.enable()
    tfquant.quantize_graph(graph, config, is_training=True)
    profiler.disable()
    added = collections.Counter(op.type for op in graph.get_operations()) - before
    # The rewrite names its scopes '<layer>/weight_quant' and '<activation>/act_quant'.
    scopes = collections.Counter()
    for op in graph.get_operations():
        for kind in ("weight_quant", "act_quant"):
            if "/%s/" % kind in op.name:
                scopes[(kind, op.name.split("/%s/" % kind)[0])] += 1
    per_kind = {kind: [n for (k, _), n in scopes.items() if k == kind] for kind in ("weight_quant", "act_quant")}
    stats = pstats.Stats(profiler).stats

    def is_tfquant(filename):
        return os.sep + "tfquant" + os.sep in filename and "site-packages" not in filename

    total = max(entry[3] for (filename, _, name), entry in stats.items()
                if name == "quantize_graph" and is_tfquant(filename))
    own = sum(entry[2] for (filename, _, _), entry in stats.items() if is_tfquant(filename))
    # TensorFlow never calls back into tfquant in a training rewrite, so the calls tfquant makes into
    # TensorFlow are disjoint and their cumulative times add up.
    in_tf = sum(edge[3] for (filename, _, _), entry in stats.items() if "tensorflow" in filename
                for caller, edge in entry[4].items() if is_tfquant(caller[0]))
    return {"resnet_size": resnet_size, "total_s": total, "tfquant_own_share": own / total,
            "tf_share": in_tf / total, "added_op_types": dict(added.most_common()),
            "ops_per_weight": sum(per_kind["weight_quant"]) / max(len(per_kind["weight_quant"]), 1),
            "ops_per_activation": sum(per_kind["act_quant"]) / max(len(per_kind["act_quant"]), 1),
            "weights": len(per_kind["weight_quant"]), "activations": len(per_kind["act_quant"])}


def breakdown_lines(data, rows, batch_row):
    largest = rows[-1]
    quantized = largest["quantized_layers"] or 1
    added = largest["ops_after"] - largest["ops_before"]
    per_op_us = 1e6 * largest["median_cpu_s"] / added
    # Ties by name, so a section rendered again from the JSON lists them in the same order.
    by_count = sorted(data["added_op_types"].items(), key=lambda kv: (-kv[1], kv[0]))
    top = ", ".join("%s %d" % item for item in by_count[:10])
    out = [
        "", "### Where the rewrite time goes (cProfile of one ResNet-%d rewrite)" % data["resnet_size"], "",
        "- %.0f%% of the time is in the TensorFlow calls that construct ops and variables; %.0f%% in "
        "tfquant's own Python." % (100 * data["tf_share"], 100 * data["tfquant_own_share"]),
        "- %d ops added for %d quantized layers: %.0f per weight, %.0f per activation ('ema' ranges carry "
        "their variables and update). Most added op types: %s."
        % (added, quantized, data["ops_per_weight"], data["ops_per_activation"], top),
        "- The cost is linear in the ops created, about %.0f µs of CPU per added op here." % per_op_us]
    if batch_row:
        out.append("- With `act_range='batch'` (no range variables) ResNet-%d adds %d ops and takes %.3f s "
                   "CPU (%.3f s wall), against %.3f s CPU for 'ema'."
                   % (batch_row["resnet_size"], batch_row["ops_after"] - batch_row["ops_before"],
                      batch_row["median_cpu_s"], batch_row["median_s"], largest["median_cpu_s"]))
    return out


def rerender(path, markdown, allow_busy=False):
    payload = publish.load_full_run(path)
    args = argparse.Namespace(**payload["args"])
    body = render(args, payload["sizes"], payload["linear"], payload["machine"], payload["load_before"],
                  payload["profile"], payload["batch_range_largest"], payload["command"])
    publish.publish(SECTION, body, markdown, payload["load_before"], payload["machine"]["load_average"], allow_busy)
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser)
    parser.add_argument("--sizes", help="comma-separated ResNet depths (default 20,56,110; quick 20,32)")
    parser.add_argument("--repeats", type=int, default=None, help="fresh graphs per depth (default 3; 1 quick)")
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args(argv)
    if args.render_json:
        return rerender(args.render_json, args.markdown, args.allow_busy)
    quick = args.quick
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(QUICK_SIZES if quick else SIZES)
    args.repeats = args.repeats or (1 if quick else 3)

    def log(message):
        print("[rewrite_cost] " + message, flush=True)

    load_before = publish.start(args)
    config = graphs.tfquant_config(4, 4, "channel")
    if not quick:
        # One untimed rewrite first: imports and TensorFlow's lazy registrations are not rewrite cost.
        warm, _ = graphs.build_loss_graph(sizes[0], args.batch_size)
        tfquant.quantize_graph(warm, config)
        del warm
    rows = [measure(size, args.batch_size, args.repeats, config, log) for size in sorted(sizes)]
    rates = [r["ops_per_cpu_s"] for r in rows]
    wall_rates = [r["ops_per_s"] for r in rows]
    spread = max(rates) / min(rates)
    linear = {"spread": spread, "spread_wall": max(wall_rates) / min(wall_rates),
              "ok": spread <= LINEAR_TOLERANCE, "tolerance": LINEAR_TOLERANCE}
    profile_data = batch_row = None
    if not quick:
        batch_config = tfquant.QuantConfig(weight_bits=4, activation_bits=4, use_buckets=True,
                                           bucket_type="channel", act_range="batch")
        batch_row = measure(sorted(sizes)[-1], args.batch_size, args.repeats, batch_config,
                            lambda message: log("act_range='batch': " + message))
        profile_data = breakdown(sorted(sizes)[-1], args.batch_size, config)
        log("profile: %.0f%% in TensorFlow calls, %.0f%% tfquant's own code"
            % (100 * profile_data["tf_share"], 100 * profile_data["tfquant_own_share"]))
    info = machine.machine_info(load=machine.end_load(args.quick))
    log("ops/s (CPU) spread %.2f (linear if <= %.1f); largest median %.3f s wall, %.3f s CPU"
        % (spread, LINEAR_TOLERANCE, rows[-1]["median_s"], rows[-1]["median_cpu_s"]))
    payload = {"benchmark": SECTION, "quick": quick, "config": config.to_dict(), "repeats": args.repeats,
               "batch_size": args.batch_size, "sizes": rows, "linear": linear,
               "largest_under_target": rows[-1]["median_s"] < TIME_TARGET_S, "time_target_s": TIME_TARGET_S,
               "machine": info, "load_before": load_before, "profile": profile_data,
               "batch_range_largest": batch_row, "command": publish.command_line(), "args": vars(args)}
    publish.write_json(publish.results_path(args, SECTION), payload)
    if not quick:
        publish.publish(SECTION, render(args, rows, linear, info, load_before, profile_data, batch_row,
                                        payload["command"]), args.markdown, load_before, info["load_average"],
                        args.allow_busy)
        log("wrote section %s of %s" % (SECTION, args.markdown))
    return payload


if __name__ == "__main__":
    publish.run_main(main)
