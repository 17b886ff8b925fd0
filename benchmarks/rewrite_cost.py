"""Cost of tfquant.quantize_graph against building the float graph it rewrites, on ResNets of growing depth.

Graph: the ResNet forward pass (training mode) and loss, one batch held in the graph, no gradients yet (what a
learner hands quantize_graph); W4A4, channel buckets, first and last layer float, 'ema' activation ranges.
Each round builds that float graph (timed: "build") and then rewrites the same graph (timed: "rewrite"), the
two interleaved round after round in one process, so both see the same machine; the garbage collector is
paused while either is timed. Reported per depth: the medians of both, in wall-clock and process CPU time,
their ratio (the target: rewrite <= 0.5 x build), ops added, and ops/s (a roughly constant ops/s means the
rewrite grows linearly with the graph). The rewrite is single-threaded Python, so on a machine shared with
other jobs its CPU time is the steadier figure. A cProfile of one rewrite of the largest network lists its
top 10 functions by own time and the op types it adds.

  .venv/bin/python -m benchmarks.rewrite_cost            # full run, writes its BENCHMARKS.md section
  .venv/bin/python -m benchmarks.rewrite_cost --quick --output /tmp/rewrite.json   # ResNet-20 and -32, batch 8
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
QUICK_BATCH = 8
# The rewrite of the largest network may take at most this fraction of its float graph's build.
RATIO_TARGET = 0.5
# ops/s of the largest and smallest network within this factor counts as linear growth.
LINEAR_TOLERANCE = 1.5
PROFILE_TOP = 10


def _timed_cpu(fn):
    """(wall seconds, process CPU seconds, result) of fn() with the garbage collector paused."""
    gc.collect()
    gc.disable()
    try:
        cpu_start = time.process_time()
        wall, result = stats.timed(fn)
        return wall, time.process_time() - cpu_start, result
    finally:
        gc.enable()


def measure(resnet_size, batch_size, repeats, config, log):
    """Interleaved rounds of (build the float graph, rewrite it); returns the depth's row."""
    build_wall, build_cpu, wall, cpu = [], [], [], []
    ops_before = ops_after = layers = None
    for _ in range(repeats):
        seconds, cpu_seconds, (graph, ops_before) = _timed_cpu(lambda: graphs.build_loss_graph(resnet_size, batch_size))
        build_wall.append(seconds)
        build_cpu.append(cpu_seconds)
        seconds, cpu_seconds, report = _timed_cpu(lambda: tfquant.quantize_graph(graph, config, is_training=True))
        wall.append(seconds)
        cpu.append(cpu_seconds)
        ops_after = len(graph.get_operations())
        layers = sum(1 for layer in report.layers if layer.quantized)
        del graph, report
    med, cpu_med = stats.median(wall), stats.median(cpu)
    build_med, build_cpu_med = stats.median(build_wall), stats.median(build_cpu)
    round_ratios = [c / b for c, b in zip(cpu, build_cpu)]
    log("ResNet-%d: %d ops; rewrite %.3f s CPU (%.3f wall), float build %.3f s CPU (%.3f wall): %.2f x CPU, "
        "%.2f x wall over %d rounds" % (resnet_size, ops_before, cpu_med, med, build_cpu_med, build_med,
                                        cpu_med / build_cpu_med, med / build_med, repeats))
    return {"resnet_size": resnet_size, "ops_before": ops_before, "ops_after": ops_after,
            "quantized_layers": layers, "median_s": med, "times_s": wall, "ops_per_s": ops_before / med,
            "median_cpu_s": cpu_med, "cpu_times_s": cpu, "ops_per_cpu_s": ops_before / cpu_med,
            "build_times_s": build_wall, "build_cpu_times_s": build_cpu, "median_build_s": build_med,
            "median_build_cpu_s": build_cpu_med, "ratio_cpu": cpu_med / build_cpu_med, "ratio_wall": med / build_med,
            "round_ratios_cpu": round_ratios, "median_round_ratio_cpu": stats.median(round_ratios)}


def render(args, rows, linear, info, load_before, profile_data, batch_row, command):
    largest = rows[-1]
    lines = ["## Rewrite cost of `tfquant.quantize_graph`", "",
             "Command: `%s`" % command, ""]
    lines.extend(machine.machine_lines(info, load_before))
    lines.extend([
        "- Graph: ResNet forward pass (training mode) and loss, batch %d held in the graph, no gradients yet; "
        "W4A4, channel buckets, first and last layer float, 'ema' activation ranges." % args.batch_size,
        "- Timed, interleaved in one process for %d rounds per depth: building that float graph ('build') and "
        "then rewriting it with `quantize_graph` ('rewrite'), garbage collector paused; medians of wall-clock "
        "and process CPU time." % args.repeats,
        ""])
    table = [("ResNet-%d" % r["resnet_size"], r["ops_before"], r["ops_after"] - r["ops_before"],
              r["quantized_layers"], "%.3f" % r["median_build_cpu_s"], "%.3f" % r["median_cpu_s"],
              "%.2f" % r["ratio_cpu"], "%.3f" % r["median_build_s"], "%.3f" % r["median_s"],
              "%.2f" % r["ratio_wall"], "%.0f" % r["ops_per_cpu_s"],
              "%.0f" % (1e6 * r["median_cpu_s"] / (r["ops_after"] - r["ops_before"]))) for r in rows]
    lines.append(publish.markdown_table(
        ["network", "ops before", "ops added", "layers quantized", "build CPU s", "rewrite CPU s",
         "rewrite / build (CPU)", "build wall s", "rewrite wall s", "rewrite / build (wall)", "ops/s (CPU)",
         "CPU µs per added op"], table))
    lines.extend(["",
                  "- Linear growth: ops/s (CPU) of the largest and smallest network differ by a factor of %.2f "
                  "(wall: %.2f; tolerance %.1f): %s."
                  % (linear["spread"], linear["spread_wall"], LINEAR_TOLERANCE,
                     "met" if linear["ok"] else "**not met**"),
                  "- ResNet-%d rewrite: %.2f x its float graph's build in CPU time, %.2f x in wall time (median of "
                  "the rounds' CPU ratios %.2f; target <= %.1f x): %s."
                  % (largest["resnet_size"], largest["ratio_cpu"], largest["ratio_wall"],
                     largest["median_round_ratio_cpu"], RATIO_TARGET, verdict(largest))])
    if profile_data:
        lines.extend(breakdown_lines(profile_data, rows, batch_row))
    return "\n".join(lines)


def verdict(row):
    """'met' / 'met in CPU time, ...' / '**not met**' for the ratio target."""
    if row["ratio_wall"] <= RATIO_TARGET and row["ratio_cpu"] <= RATIO_TARGET:
        return "met"
    if row["ratio_cpu"] <= RATIO_TARGET:
        return "met in CPU time, missed in wall time (machine shared with other jobs)"
    return "**not met**"


def _short_path(filename):
    """A profile entry's file, from its package on ('~' for built-ins)."""
    for marker in ("site-packages" + os.sep, os.sep + "tfquant" + os.sep, os.sep + "benchmarks" + os.sep):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return tail if marker.startswith("site") else marker.strip(os.sep) + os.sep + tail
    return filename


def top_functions(profile_stats, count=PROFILE_TOP):
    """The `count` functions of a pstats table with the most own time: [{function, calls, own_s, cumulative_s}]."""
    entries = sorted(profile_stats.items(), key=lambda item: (-item[1][2], item[0]))[:count]
    return [{"function": name if filename == "~" else "%s:%d(%s)" % (_short_path(filename), line, name),
             "calls": calls, "own_s": own, "cumulative_s": cumulative}
            for (filename, line, name), (_, calls, own, cumulative, _) in entries]


def breakdown(resnet_size, batch_size, config):
    """Where one rewrite's time goes (cProfile) and which op types it adds."""
    graph, _ = graphs.build_loss_graph(resnet_size, batch_size)
    before = collections.Counter(op.type for op in graph.get_operations())
    names_before = {op.name for op in graph.get_operations()}
    profiler = cProfile.Profile()
    profiler.enable()
    tfquant.quantize_graph(graph, config, is_training=True)
    profiler.disable()
    added = collections.Counter(op.type for op in graph.get_operations()) - before
    # The rewrite names its scopes '<layer>/weight_quant' and '<activation>/act_quant'; constants every
    # quantizer shares are outside them.
    scopes, shared = collections.Counter(), 0
    for op in graph.get_operations():
        if op.name in names_before:
            continue
        for kind in ("weight_quant", "act_quant"):
            if "/%s/" % kind in op.name:
                scopes[(kind, op.name.split("/%s/" % kind)[0])] += 1
                break
        else:
            shared += 1
    per_kind = {kind: [n for (k, _), n in scopes.items() if k == kind] for kind in ("weight_quant", "act_quant")}
    profile_stats = pstats.Stats(profiler).stats

    def is_tfquant(filename):
        return os.sep + "tfquant" + os.sep in filename and "site-packages" not in filename

    total = max(entry[3] for (filename, _, name), entry in profile_stats.items()
                if name == "quantize_graph" and is_tfquant(filename))
    own = sum(entry[2] for (filename, _, _), entry in profile_stats.items() if is_tfquant(filename))
    # TensorFlow never calls back into tfquant in a training rewrite, so the calls tfquant makes into
    # TensorFlow are disjoint and their cumulative times add up.
    in_tf = sum(edge[3] for (filename, _, _), entry in profile_stats.items() if "tensorflow" in filename
                for caller, edge in entry[4].items() if is_tfquant(caller[0]))
    return {"resnet_size": resnet_size, "total_s": total, "tfquant_own_share": own / total,
            "tf_share": in_tf / total, "added_op_types": dict(added.most_common()),
            "ops_per_weight": sum(per_kind["weight_quant"]) / max(len(per_kind["weight_quant"]), 1),
            "ops_per_activation": sum(per_kind["act_quant"]) / max(len(per_kind["act_quant"]), 1),
            "weights": len(per_kind["weight_quant"]), "activations": len(per_kind["act_quant"]),
            "shared_ops": shared, "top_functions": top_functions(profile_stats)}


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
        "their variables and update), %d constants shared by all. Most added op types: %s."
        % (added, quantized, data["ops_per_weight"], data["ops_per_activation"], data.get("shared_ops", 0), top),
        "- The cost is linear in the ops created, about %.0f µs of CPU per added op here." % per_op_us]
    if batch_row:
        out.append("- With `act_range='batch'` (no range variables) ResNet-%d adds %d ops and takes %.3f s "
                   "CPU (%.3f s wall, %.2f x its build in CPU time), against %.3f s CPU for 'ema'."
                   % (batch_row["resnet_size"], batch_row["ops_after"] - batch_row["ops_before"],
                      batch_row["median_cpu_s"], batch_row["median_s"], batch_row["ratio_cpu"],
                      largest["median_cpu_s"]))
    if data.get("top_functions"):
        out.extend(["", "Top %d functions by own time (profiled total %.3f s; cProfile slows small calls, so read "
                    "the shares, not the seconds):" % (len(data["top_functions"]), data["total_s"]), ""])
        out.append(publish.markdown_table(
            ["function", "calls", "own s", "cumulative s", "own share"],
            [("`%s`" % f["function"], f["calls"], "%.3f" % f["own_s"], "%.3f" % f["cumulative_s"],
              "%.1f%%" % (100 * f["own_s"] / data["total_s"])) for f in data["top_functions"]]))
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
    parser.add_argument("--repeats", type=int, default=None, help="rounds per depth (default 5; 2 quick)")
    parser.add_argument("--batch_size", type=int, default=None, help="default 128 (quick %d)" % QUICK_BATCH)
    args = parser.parse_args(argv)
    if args.render_json:
        return rerender(args.render_json, args.markdown, args.allow_busy)
    quick = args.quick
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(QUICK_SIZES if quick else SIZES)
    args.repeats = args.repeats or (2 if quick else 5)
    args.batch_size = args.batch_size or (QUICK_BATCH if quick else 128)

    def log(message):
        print("[rewrite_cost] " + message, flush=True)

    load_before = publish.start(args)
    config = graphs.tfquant_config(4, 4, "channel")
    # One untimed build and rewrite first: imports and TensorFlow's lazy registrations are neither's cost.
    warm, _ = graphs.build_loss_graph(sizes[0], args.batch_size)
    tfquant.quantize_graph(warm, config)
    del warm
    rows = [measure(size, args.batch_size, args.repeats, config, log) for size in sorted(sizes)]
    rates = [r["ops_per_cpu_s"] for r in rows]
    wall_rates = [r["ops_per_s"] for r in rows]
    spread = max(rates) / min(rates)
    linear = {"spread": spread, "spread_wall": max(wall_rates) / min(wall_rates),
              "ok": spread <= LINEAR_TOLERANCE, "tolerance": LINEAR_TOLERANCE}
    batch_row = None
    if not quick:
        batch_config = tfquant.QuantConfig(weight_bits=4, activation_bits=4, use_buckets=True,
                                           bucket_type="channel", act_range="batch")
        batch_row = measure(sorted(sizes)[-1], args.batch_size, args.repeats, batch_config,
                            lambda message: log("act_range='batch': " + message))
    profile_data = breakdown(sorted(sizes)[-1], args.batch_size, config)
    log("profile: %.0f%% in TensorFlow calls, %.0f%% tfquant's own code; top functions by own time:"
        % (100 * profile_data["tf_share"], 100 * profile_data["tfquant_own_share"]))
    for entry in profile_data["top_functions"]:
        log("  %6.3f s own %6.3f s cum %7d calls  %s"
            % (entry["own_s"], entry["cumulative_s"], entry["calls"], entry["function"]))
    info = machine.machine_info(load=machine.end_load(args.quick))
    largest = rows[-1]
    log("ops/s (CPU) spread %.2f (linear if <= %.1f); ResNet-%d rewrite / build %.2f x CPU, %.2f x wall "
        "(target <= %.1f)" % (spread, LINEAR_TOLERANCE, largest["resnet_size"], largest["ratio_cpu"],
                              largest["ratio_wall"], RATIO_TARGET))
    payload = {"benchmark": SECTION, "quick": quick, "config": config.to_dict(), "repeats": args.repeats,
               "batch_size": args.batch_size, "sizes": rows, "linear": linear,
               "ratio_target": RATIO_TARGET, "largest_within_target": largest["ratio_cpu"] <= RATIO_TARGET,
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
