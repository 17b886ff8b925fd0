"""Training-step time of ResNet-20 quantized by tfquant, against float and TensorFlow's fused fake-quant ops.

Every mode's graph and session is built and warmed up first; then the modes are run in interleaved
rounds (round r: K steps of every mode in turn), so load from other processes and clock drift hit all
modes alike. Reported: the median step time per mode and its ratio to float's median.

  .venv/bin/python -m benchmarks.train_overhead            # full run, writes its BENCHMARKS.md section
  .venv/bin/python -m benchmarks.train_overhead --quick --output /tmp/train.json
"""
import argparse
import collections
import dataclasses
import re

import tensorflow as tf

from benchmarks import graphs, machine, publish, stats

SECTION = "train_overhead"
FLOAT = "float"
PEER = "peer-fused-w4a4"
BITS = (("w8a8", 8, 8), ("w4a4", 4, 4), ("w2a32", 2, 32))
BUCKETS = (("none", "none"), ("channel", "channel"), ("split256", "split"))
QUICK_MODES = (FLOAT, "w4a4-channel", "w4a4-split256", "w4a4-channel-folded", PEER)
CHANNEL_TARGET = 1.05
FOLD_TARGET = 1.05
# Batch-norm folding with the symmetric grid (issue 13), timed against the same bits and buckets unfolded.
FOLDED = (("w8a8-channel-folded", "w8a8-channel"), ("w4a4-channel-folded", "w4a4-channel"))
SPLIT_TARGET = 1.10
# Scopes under which the rewrites put their ops (forward, and the gradient ops TF derives from them).
INSERTED_SCOPES = re.compile(r"(weight_quant|act_quant|peer_weight_quant|peer_act_quant)(_\d+)?/")


def all_modes():
    """Mode name -> quantization (None, a QuantConfig or the peer tuple), in report order."""
    modes = collections.OrderedDict([(FLOAT, None)])
    for bits_name, weight_bits, activation_bits in BITS:
        for bucket_name, bucket_type in BUCKETS:
            modes["%s-%s" % (bits_name, bucket_name)] = graphs.tfquant_config(
                weight_bits, activation_bits, bucket_type, 256)
    for folded, unfolded in FOLDED:
        modes[folded] = dataclasses.replace(modes[unfolded], weight_scheme="symmetric", fold_batch_norms=True)
    modes[PEER] = ("peer", 4, 4)
    return modes


def describe(mode):
    if mode == FLOAT:
        return "float"
    if mode == PEER:
        return "TF fused fake-quant W4A4 (per-channel weights)"
    bits, buckets = mode.split("-")[:2]
    folded = ", symmetric weights, batch norm folded" if mode.endswith("-folded") else ""
    buckets = {"none": "no buckets", "channel": "channel buckets", "split256": "split buckets of 256"}[buckets]
    return "tfquant %s, %s%s" % (bits.upper(), buckets, folded)


def run_interleaved(built, rounds, steps_per_round, log):
    """Per-step times of every mode, collected in alternating rounds."""
    times = {name: [] for name in built}
    per_round = {name: [] for name in built}
    for r in range(rounds):
        for name, graph in built.items():
            round_times = []
            for _ in range(steps_per_round):
                seconds, _ = stats.timed(graph.step)
                round_times.append(seconds)
            times[name].extend(round_times)
            per_round[name].append(stats.median(round_times))
        log("round %d/%d: %s" % (r + 1, rounds, ", ".join(
            "%s %.3f" % (name, per_round[name][-1]) for name in built)))
    return times, per_round


def summarize(times, per_round):
    """Median per mode, ratio of medians to float, and the median of per-round ratios."""
    float_median = stats.median(times[FLOAT])
    result = collections.OrderedDict()
    for name, values in times.items():
        med = stats.median(values)
        round_ratios = [m / f for m, f in zip(per_round[name], per_round[FLOAT])]
        result[name] = {"median_s": med, "ratio": med / float_median, "steps": len(values),
                        "min_s": min(values), "max_s": max(values), "times_s": values,
                        "median_round_ratio": stats.median(round_ratios)}
    return result


def check_targets(results):
    """(target description, mode, ratio, limit, met) for every target the brief sets."""
    checks = []
    peer_ratio = results[PEER]["ratio"] if PEER in results else None
    for name, entry in results.items():
        if name in (FLOAT, PEER):
            continue
        if name == "w4a4-channel":
            checks.append(("channel W4A4 <= %.2fx float" % CHANNEL_TARGET, name, entry["ratio"], CHANNEL_TARGET))
        if name.endswith("split256"):
            checks.append(("split-256 <= %.2fx float" % SPLIT_TARGET, name, entry["ratio"], SPLIT_TARGET))
        unfolded = dict(FOLDED).get(name)
        if unfolded in results:
            checks.append(("folding <= %.2fx `%s`" % (FOLD_TARGET, unfolded), name,
                           entry["median_s"] / results[unfolded]["median_s"], FOLD_TARGET))
            continue
        if peer_ratio is not None:
            checks.append(("<= fused peer's ratio", name, entry["ratio"], peer_ratio))
    return [(what, name, ratio, limit, ratio <= limit) for what, name, ratio, limit in checks]


# ----------------------------------------------------------------------------- profiling

def _op_type(node, types_by_name):
    name = node.node_name.split(":")[0]
    if name in types_by_name:
        return types_by_name[name]
    # Grappler-made nodes (fusions, constant folds) are not in the Python graph; the label names the type.
    match = re.search(r"=\s*([\w>]+)\(", node.timeline_label)
    return match.group(1) if match else "unknown"


def _trace(graph, options, types_by_name, by_type, by_origin, steps):
    metadata = tf.compat.v1.RunMetadata()
    graph.step(options=options, run_metadata=metadata)
    for device in metadata.step_stats.dev_stats:
        for node in device.node_stats:
            micros = node.all_end_rel_micros
            if micros <= 0 or node.node_name == "_SOURCE":
                continue
            inserted = bool(INSERTED_SCOPES.search(node.node_name + "/"))
            backward = node.node_name.startswith("gradients")
            origin = ("inserted" if inserted else "model") + (" backward" if backward else " forward")
            by_type[_op_type(node, types_by_name)] += micros / 1000.0 / steps
            by_origin[origin] += micros / 1000.0 / steps


def profile_modes(built, names, steps, log):
    """Mean per-step op time (ms) by op type, and by origin: model ops vs ops the rewrite inserted.

    Traced steps alternate between the modes like the timed ones, so load changes hit all alike.
    """
    names = [FLOAT] + [n for n in names if n != FLOAT]
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    counters = {name: (collections.Counter(), collections.Counter()) for name in names}
    types = {name: {op.name: op.type for op in built[name].graph.get_operations()} for name in names}
    for name in names:
        built[name].step()  # the first traced run pays for setting tracing up
    for _ in range(steps):
        for name in names:
            _trace(built[name], options, types[name], counters[name][0], counters[name][1], steps)
    profiles = collections.OrderedDict()
    for name in names:
        profiles[name] = {"by_type": dict(counters[name][0]), "by_origin": dict(counters[name][1])}
        log("profiled %s: %.0f ms op time per step" % (name, sum(profiles[name]["by_type"].values())))
    return profiles


def profile_table(profiles, name, top):
    base, quant = profiles[FLOAT]["by_type"], profiles[name]["by_type"]
    types = sorted(set(base) | set(quant), key=lambda t: -(quant.get(t, 0.0) - base.get(t, 0.0)))
    rows = [(t, "%.1f" % base.get(t, 0.0), "%.1f" % quant.get(t, 0.0), "%+.1f" % (quant.get(t, 0.0) - base.get(t, 0.0)))
            for t in types[:top]]
    rows.append(("**all ops**", "%.1f" % sum(base.values()), "%.1f" % sum(quant.values()),
                 "%+.1f" % (sum(quant.values()) - sum(base.values()))))
    return publish.markdown_table(["op type", "float ms/step", "%s ms/step" % name, "difference"], rows)


def origin_line(profiles, name):
    origin = profiles[name]["by_origin"]
    total = sum(origin.values()) or 1.0
    parts = ["%s %.1f ms (%.0f%%)" % (k, v, 100.0 * v / total) for k, v in sorted(origin.items())]
    return "%s op time by origin: %s." % (name, "; ".join(parts))


# ----------------------------------------------------------------------------- report

def render(args, results, checks, profiles, graphs_info, info, load_before, command):
    lines = ["## Training-step overhead (ResNet-%d, batch %d)" % (args.resnet_size, args.batch_size), "",
             "Command: `%s`" % command, ""]
    lines.extend(machine.machine_lines(info, load_before, graphs.INTRA_OP_THREADS))
    lines.extend([
        "- One step = `session.run(train_op)` on a random batch held in the graph (Momentum 0.9, the "
        "ModelHelper's loss). tfquant modes keep the first and last layer float, 'ema' activation ranges. "
        "Peer: TensorFlow's fused fake-quant ops, per-channel weights and batch-range activations, 4 bits.",
        "- %d warm-up steps, then %d interleaved rounds of %d steps per mode. Ratio = median step / float's "
        "median step; per-round ratio = median over rounds of the two round medians' ratio."
        % (args.warmup, args.rounds, args.steps),
        ""])
    rows = []
    for name, entry in results.items():
        low, high = round_ratio_spread(entry, results[FLOAT], args.rounds, args.steps)
        rows.append((describe(name), "`%s`" % name, graphs_info[name]["ops"],
                     "%.1f" % (1000 * entry["median_s"]), "%.3f" % entry["ratio"],
                     "%.3f (%.2f–%.2f)" % (entry["median_round_ratio"], low, high),
                     "%.0f–%.0f" % (1000 * entry["min_s"], 1000 * entry["max_s"])))
    lines.append(publish.markdown_table(
        ["mode", "key", "graph ops", "median ms/step", "ratio to float", "per-round ratio (lowest–highest)",
         "step range ms"], rows))
    lines.extend(["", "### Targets", ""])
    estimates = op_time_estimates(profiles)
    if estimates:
        lines.extend(["Timed ratios decide 'met'; the op-time estimate is 1 + inserted ops' time / float's op "
                      "time (for the peer comparison, against the peer's own estimate).", ""])
    rows = []
    for what, name, ratio, limit, ok in checks:
        estimate = ""
        if name in estimates and name not in dict(FOLDED):  # estimates are against float, not the unfolded mode
            bound = estimates[PEER] if (what.endswith("peer's ratio") and PEER in estimates) else limit
            estimate = "%.3f (%s)" % (estimates[name], "within" if estimates[name] <= bound else "over")
        rows.append((what, "`%s`" % name, "%.3f" % ratio, "%.3f" % limit, "yes" if ok else "**no**", estimate))
    lines.append(publish.markdown_table(["target", "mode", "timed ratio", "limit", "met", "op-time estimate"],
                                       rows))
    missed = [c for c in checks if not c[4]]
    if profiles:
        lines.extend(["", "### Profile (RunMetadata FULL_TRACE, mean op time per step over %d traced steps)"
                      % args.profile_steps, "",
                      "'inserted' = ops under the rewrites' scopes (`*/weight_quant/`, `*/act_quant/`, the "
                      "peer's) and their gradient ops.", ""])
        for name in profiles:
            if name == FLOAT:
                continue
            lines.extend(["#### `%s` vs float" % name, "", profile_table(profiles, name, args.profile_top), "",
                          origin_line(profiles, name), ""])
        lines.append(origin_line(profiles, FLOAT))
    lines.extend(["", "### Findings", ""])
    lines.append(findings(results, checks, profiles) if missed else "All targets met.")
    if missed and profiles:
        lines.extend(["", ANALYSIS])
    return "\n".join(lines)


ANALYSIS = (
    "Where the time goes: an activation's quantization is Min and Max reductions and then Sub, Mul, Round, "
    "Mul and AddV2 over the tensor, all forward; the backward pass adds no op over the tensor, because the "
    "straight-through gradient is one IdentityN whose registered gradient passes the quantized output's "
    "gradient to the float input unchanged. The fused peer makes one forward pass and a second, masking "
    "pass in its gradient op. Weights cost little next to batch-sized activations (see the A32 rows). "
    "Fewer passes need the forward chain fused (a custom kernel, or XLA clustering of it).")


def op_time_estimates(profiles):
    """1 + inserted ops' time / float's op time, per profiled mode."""
    if FLOAT not in profiles:
        return {}
    float_total = model_ms(profiles[FLOAT])
    return {name: 1.0 + inserted_ms(data) / float_total for name, data in profiles.items() if name != FLOAT}


def round_ratio_spread(entry, float_entry, rounds, steps):
    """(lowest, highest) per-round ratio, from the per-step times in run order."""
    ratios = []
    for r in range(rounds):
        piece = slice(r * steps, (r + 1) * steps)
        ratios.append(stats.median(entry["times_s"][piece]) / stats.median(float_entry["times_s"][piece]))
    return min(ratios), max(ratios)


def inserted_ms(profile_data):
    return sum(v for k, v in profile_data["by_origin"].items() if k.startswith("inserted"))


def model_ms(profile_data):
    return sum(v for k, v in profile_data["by_origin"].items() if k.startswith("model"))


def findings(results, checks, profiles):
    """Statements derived from the figures: what was missed and which ops the profile blames."""
    missed = [c for c in checks if not c[4]]
    out = ["Missed: " + "; ".join("`%s` %s (%.3f > %.3f)" % (name, what, ratio, limit)
                                   for what, name, ratio, limit, _ in missed) + "."]
    if not profiles:
        return "\n".join(out)
    float_total = model_ms(profiles[FLOAT])
    model_changes = [model_ms(d) / float_total - 1 for n, d in profiles.items() if n != FLOAT]
    out.extend(["", "Noise: the model's own ops, identical in every graph, took %+.0f%% to %+.0f%% of float's "
                "op time across the profiled graphs." % (100 * min(model_changes), 100 * max(model_changes)),
                "", "Inserted ops' time per profiled mode, against float's op time:", ""])
    for name, profile_data in profiles.items():
        if name == FLOAT:
            continue
        base, quant = profiles[FLOAT]["by_type"], profile_data["by_type"]
        inserted = sorted(((v, t) for t, v in quant.items() if t not in base or base[t] < 0.05 * v), reverse=True)
        out.append("- `%s`: inserted ops %.1f ms/step = %.1f%% of float's %.1f ms; model ops %+.1f%%; "
                   "timed ratio %.3f. Largest op types absent from float: %s."
                   % (name, inserted_ms(profile_data), 100 * inserted_ms(profile_data) / float_total, float_total,
                      100 * (model_ms(profile_data) / float_total - 1), results[name]["ratio"],
                      ", ".join("%s %.1f ms" % (t, v) for v, t in inserted[:5])))
    return "\n".join(out)


def rerender(path, markdown, note=None, allow_busy=False):
    payload = publish.load_full_run(path)
    args = argparse.Namespace(**payload["args"])
    results = collections.OrderedDict((name, payload["modes"][name]) for name in all_modes()
                                      if name in payload["modes"])
    targets = [(t["target"], t["mode"], t["ratio"], t["limit"], t["met"]) for t in payload["targets"]]
    profiles = collections.OrderedDict((name, payload["profiles"][name]) for name in
                                       [FLOAT] + [n for n in payload["profiles"] if n != FLOAT]
                                       if name in payload["profiles"])
    body = render(args, results, targets, profiles, payload["graphs"], payload["machine"], payload["load_before"],
                  payload["command"])
    if note:
        body += "\n\n" + note
    publish.publish(SECTION, body, markdown, payload["load_before"], payload["machine"]["load_average"], allow_busy)
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser)
    parser.add_argument("--resnet_size", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=None, help="default 128 (8 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 12; 1 quick)")
    parser.add_argument("--steps", type=int, default=None, help="steps per mode per round (default 3; 2 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (default 3; 1 quick)")
    parser.add_argument("--modes", help="comma-separated subset of modes (default: all; quick: %s)"
                        % ",".join(QUICK_MODES))
    parser.add_argument("--profile", choices=("auto", "always", "never"), default=None,
                        help="trace float and quantized steps: when a target is missed (auto, the full "
                             "default), always, or never (the quick default)")
    parser.add_argument("--profile_steps", type=int, default=3)
    parser.add_argument("--profile_top", type=int, default=12)
    parser.add_argument("--note", help="with --render_json: a paragraph appended to the section")
    args = parser.parse_args(argv)
    if args.render_json:
        return rerender(args.render_json, args.markdown, args.note, args.allow_busy)
    quick = args.quick
    args.batch_size = args.batch_size or (8 if quick else 128)
    args.rounds = args.rounds or (1 if quick else 12)
    args.steps = args.steps or (2 if quick else 3)
    args.warmup = args.warmup or (1 if quick else 3)
    args.profile = args.profile or ("never" if quick else "auto")

    def log(message):
        print("[train_overhead] " + message, flush=True)

    modes = all_modes()
    wanted = args.modes.split(",") if args.modes else (list(QUICK_MODES) if quick else list(modes))
    unknown = [m for m in wanted if m not in modes]
    if unknown:
        parser.error("unknown mode(s) %s; expected some of %s" % (", ".join(unknown), ", ".join(modes)))
    if FLOAT not in wanted:
        wanted.insert(0, FLOAT)
    load_before = publish.start(args)
    built, graphs_info = collections.OrderedDict(), {}
    for name in [m for m in modes if m in wanted]:
        build_s, graph = stats.timed(lambda: graphs.TrainGraph(args.resnet_size, args.batch_size, modes[name]))
        graph.start()
        for _ in range(args.warmup):
            graph.step()
        built[name] = graph
        graphs_info[name] = {"ops": len(graph.graph.get_operations()), "build_s": build_s}
        log("built %s (%d ops, %.1f s) and warmed up" % (name, graphs_info[name]["ops"], build_s))
    times, per_round = run_interleaved(built, args.rounds, args.steps, log)
    results = summarize(times, per_round)
    checks = check_targets(results)
    profiles = {}
    missed_modes = sorted({name for _, name, _, _, ok in checks if not ok})
    if args.profile == "always" or (args.profile == "auto" and missed_modes):
        to_profile = [m for m in ("w4a4-channel", "w4a4-split256", PEER) if m in built]
        to_profile += [m for m in missed_modes if m not in to_profile]
        profiles = profile_modes(built, to_profile, args.profile_steps, log)
    for graph in built.values():
        graph.close()
    info = machine.machine_info(load=machine.end_load(args.quick))
    for name, entry in results.items():
        log("%-16s median %.1f ms  ratio %.3f  per-round ratio %.3f"
            % (name, 1000 * entry["median_s"], entry["ratio"], entry["median_round_ratio"]))
    for what, name, ratio, limit, ok in checks:
        log("target %-28s %-16s %.3f vs %.3f %s" % (what, name, ratio, limit, "met" if ok else "MISSED"))
    payload = {"benchmark": SECTION, "quick": quick, "resnet_size": args.resnet_size,
               "batch_size": args.batch_size, "rounds": args.rounds, "steps_per_round": args.steps,
               "float_mode": FLOAT, "modes": results, "graphs": graphs_info,
               "targets": [{"target": w, "mode": n, "ratio": r, "limit": l, "met": ok}
                           for w, n, r, l, ok in checks],
               "profiles": profiles, "machine": info, "load_before": load_before,
               "command": publish.command_line(), "args": vars(args)}
    publish.write_json(publish.results_path(args, SECTION), payload)
    if not quick:
        publish.publish(SECTION, render(args, results, checks, profiles, graphs_info, info, load_before,
                                        payload["command"]), args.markdown, load_before, info["load_average"],
                        args.allow_busy)
        log("wrote section %s of %s" % (SECTION, args.markdown))
    return payload


if __name__ == "__main__":
    publish.run_main(main)
