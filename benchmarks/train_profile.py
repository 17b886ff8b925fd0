"""RunMetadata traces of training steps: mean op time per step by op type, and by origin (the model's ops
against the ops a quantization rewrite inserted), for benchmarks.train_overhead's profile tables."""
import collections
import re

import tensorflow as tf

from benchmarks import publish

FLOAT = "float"
# Scopes under which the rewrites put their ops (forward, and the gradient ops TF derives from them).
INSERTED_SCOPES = re.compile(r"(weight_quant|act_quant|peer_weight_quant|peer_act_quant)(_\d+)?/")


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


def op_time_estimates(profiles):
    """1 + inserted ops' time / float's op time, per profiled mode."""
    if FLOAT not in profiles:
        return {}
    float_total = model_ms(profiles[FLOAT])
    return {name: 1.0 + inserted_ms(data) / float_total for name, data in profiles.items() if name != FLOAT}


def inserted_ms(profile_data):
    return sum(v for k, v in profile_data["by_origin"].items() if k.startswith("inserted"))


def model_ms(profile_data):
    return sum(v for k, v in profile_data["by_origin"].items() if k.startswith("model"))
