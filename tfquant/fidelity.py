"""Per-layer fidelity of a quantized network: how far each quantized tensor is from its float value.

For every quantized weight and activation (see layer_switches): the quantizer's own error on the values
it sees in the quantized network — SQNR in dB, RMSE in steps of its grid, the fraction of values clipped
(farther than half a step from their level), the range of levels used against the observed min/max — and,
as TFLite's QuantizationDebugger reports it, the error each layer's output carries against the float
network's, accumulated through every quantized layer before it (the same images through the graph with
every switch on, then every switch off). Pure NumPy over arrays, plus `measure`, which runs a session it
is given.

A grid's step is read off the quantized values themselves (the smallest gap between two levels of a
range group), so no grid formula is repeated here.
"""
import math

import numpy as np
import tensorflow as tf

from tfquant import layer_switches
from tfquant.layout import GroupLayout

HISTOGRAM_BINS = 40
# Quantization levels drawn on a histogram; wider grids are described by their step alone.
MAX_LEVELS = 256
# Relative slack on "more than half a step away": float32 levels are not exact multiples of the step.
_CLIP_SLACK = 1e-3
_DIGITS = 6
# Levels are read off a sample of each chunk: sorting every activation value would cost more than the network.
_SAMPLE = 1 << 18


def rounded(value):
    """A float rounded to 6 significant digits (what the report stores and the HTML prints), None kept."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return float("%.*g" % (_DIGITS, value))


def sqnr_db(reference, approximation):
    """10·log10(Σ reference² / Σ (reference − approximation)²); None when the two are equal (infinite SQNR)."""
    reference = np.asarray(reference, np.float64)
    noise = np.sum((reference - np.asarray(approximation, np.float64)) ** 2)
    if noise == 0.0:
        return None
    signal = np.sum(reference ** 2)
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def group_rows(array, layout):
    """The range groups of `array` as a list of flat arrays, numbered as GroupLayout numbers them.

    Args:
      array: NumPy array of the weight's shape.
      layout: a GroupLayout (none: one group; channel: one per index of channel_axes; split: pieces).
    """
    array = np.asarray(array)
    if layout.kind == "none":
        return [array.reshape(-1)]
    if layout.kind == "channel":
        rank = array.ndim
        axes = [a % rank for a in layout.channel_axes]
        rest = [a for a in range(rank) if a not in axes]
        moved = np.transpose(array, axes + rest)
        groups = int(np.prod([array.shape[a] for a in axes]))
        return list(moved.reshape(groups, -1))
    flat = array.reshape(-1)
    return [flat[i:i + layout.bucket_size] for i in range(0, flat.size, layout.bucket_size)]


def grid_step(levels, bits=None):
    """The step of a uniform grid from the levels it takes; None with fewer than two distinct levels.

    The smallest gap between two levels used is the step when neighbouring levels occur, which a tensor with
    many values per level always shows. A group with fewer distinct levels than half its grid (a 3x3 kernel at
    8 bits) may skip them; then, given the bits, the gap is divided by the whole number of steps that puts the
    levels' span closest to the 2^k - 1 steps of the grid (exact for min/max and symmetric grids).

    Args:
      levels: the quantized values (any order, repeats allowed).
      bits: the grid's bits, or None to take the smallest gap as it is.
    """
    levels = np.unique(np.asarray(levels, np.float64))
    if levels.size < 2:
        return None
    gaps = np.diff(levels)
    # float32 levels differ from exact multiples of the step by rounding: ignore gaps far below the widest.
    gaps = gaps[gaps > 1e-4 * gaps.max()]
    gap = float(gaps.min())
    if bits is None or levels.size >= 2 ** (bits - 1):
        return gap
    smallest = (levels[-1] - levels[0]) / (2 ** bits - 1)
    return gap / max(1, int(round(gap / smallest)))


class TensorStats:
    """Running sums of one quantized tensor's error; `add` chunk by chunk, `record` at the end."""

    def __init__(self):
        self.count = 0
        self.signal = self.noise = self.noise_in_steps = 0.0
        self.stepped = self.clipped = 0
        self.low = self.high = None
        self.level_low = self.level_high = None

    def add(self, x, q, step):
        """One chunk of float values x, their quantized values q and the step of each value's group.

        Args:
          x, q: float arrays of one shape.
          step: None (no step known: no RMSE in steps, no clipping), a number, or an array broadcastable to x.
        """
        x = np.asarray(x).reshape(-1)
        q = np.asarray(q).reshape(-1)
        if x.size == 0:
            return
        # Sums in float64 (dot products: one pass each); the extremes on the arrays as they came.
        wide = x.astype(np.float64)
        error = wide - q
        self.count += x.size
        self.signal += float(np.dot(wide, wide))
        noise = float(np.dot(error, error))
        self.noise += noise
        if step is not None and np.ndim(step) == 0:
            if math.isfinite(step) and step > 0:
                self.stepped += x.size
                self.noise_in_steps += noise / (step * step)
                self.clipped += int(np.count_nonzero(np.abs(error) > 0.5 * step * (1 + _CLIP_SLACK)))
        elif step is not None:
            step = np.broadcast_to(np.asarray(step, np.float64).reshape(-1), x.shape)
            known = np.isfinite(step) & (step > 0)
            self.stepped += int(np.sum(known))
            self.noise_in_steps += float(np.sum((error[known] / step[known]) ** 2))
            self.clipped += int(np.sum(np.abs(error[known]) > 0.5 * step[known] * (1 + _CLIP_SLACK)))
        for name, value, pick in (("low", x.min(), min), ("level_low", q.min(), min), ("high", x.max(), max),
                                  ("level_high", q.max(), max)):
            current = getattr(self, name)
            setattr(self, name, float(value) if current is None else pick(current, float(value)))

    def record(self):
        """{sqnr_db, rmse_over_step, clipped_fraction, range_used, observed, values} (numbers rounded)."""
        if self.noise == 0.0:
            sqnr = None
        elif self.signal == 0.0:
            sqnr = None
        else:
            sqnr = 10.0 * math.log10(self.signal / self.noise)
        return {
            "values": self.count,
            "sqnr_db": rounded(sqnr),
            "rmse_over_step": rounded(math.sqrt(self.noise_in_steps / self.stepped)) if self.stepped else None,
            "clipped_fraction": rounded(self.clipped / self.stepped) if self.stepped else None,
            "range_used": [rounded(self.level_low), rounded(self.level_high)],
            "observed": [rounded(self.low), rounded(self.high)],
        }


def histogram(values, low, high, bins=HISTOGRAM_BINS):
    """Counts of `values` in `bins` equal bins over [low, high] (values outside go to the end bins)."""
    values = np.asarray(values).reshape(-1)
    if high <= low:
        high = low + 1.0
    scaled = (values - np.float64(low)) * (bins / (high - low))
    index = np.clip(scaled, 0, bins - 1).astype(np.int64)
    return np.bincount(index, minlength=bins)


def _levels_entry(levels, group=None):
    levels = np.unique(np.asarray(levels, np.float64))
    if levels.size > MAX_LEVELS:
        return {"levels": None, "levels_group": group}
    return {"levels": [rounded(v) for v in levels], "levels_group": group}


def weight_fidelity(x, q, layout, bits=None):
    """Fidelity of one quantized weight.

    Args:
      x: the float weight (NumPy), q: its quantized value, layout: its GroupLayout, bits: its bits (see
        grid_step).
    Returns:
      the record (see TensorStats.record) plus 'histogram' {'range', 'counts'} of x, 'levels' (the grid
      levels of the group with the widest range, or of the tensor; None when more than MAX_LEVELS) and
      'levels_group' (that group's number, None for one group).
    """
    x = np.asarray(x, np.float64)
    q = np.asarray(q, np.float64)
    stats = TensorStats()
    x_groups, q_groups = group_rows(x, layout), group_rows(q, layout)
    for xg, qg in zip(x_groups, q_groups):
        stats.add(xg, qg, grid_step(qg, bits))
    record = stats.record()
    low, high = float(x.min()), float(x.max())
    record["histogram"] = {"range": [rounded(low), rounded(high)],
                           "counts": [int(c) for c in histogram(x, low, high)]}
    if len(q_groups) == 1:
        record.update(_levels_entry(q_groups[0]))
    else:
        widest = int(np.argmax([g.max() - g.min() for g in q_groups]))
        record.update(_levels_entry(q_groups[widest], widest))
    return record


def _sample(values):
    """At most _SAMPLE values of an array, a fixed random choice: a level that a chunk's values use more than a
    few times in a million is all but certain to be among them."""
    flat = np.asarray(values).reshape(-1)
    if flat.size <= _SAMPLE:
        return flat
    return flat[np.random.RandomState(flat.size % 1000003).randint(0, flat.size, _SAMPLE)]


def measure(sess, switches, feeds, final_tensor=None, weight_layouts=None):
    """Fidelity of every switched layer on the data the feeds carry.

    Args:
      sess: a session of the switched graph, variables restored.
      switches: [LayerSwitch] from layer_switches.insert_switches.
      feeds: a list of feed dicts (each one chunk of images); run twice each (pass 1: ranges, and levels on the
        first chunk; pass 2: errors, histograms, float network).
      final_tensor: the network's output (logits); with it, 'output' holds its SQNR against the float
        network and the share of examples whose top class agrees.
      weight_layouts: {layer name: GroupLayout} of the weight layers (default: one group).
    Returns:
      {'layers': [per-layer record, report order], 'output': {...} or None}. Each record has name, kind,
      bits, the TensorStats fields, 'histogram', 'levels', 'levels_group', and 'output_sqnr_db': the SQNR
      of the layer's output (a weight layer's op output, an activation's quantized value) in the quantized
      network against the float network's.
    """
    weight_layouts = weight_layouts or {}
    unique = []
    for record in switches:
        if all(record.quantized_tensor is not other.quantized_tensor for other in unique):
            unique.append(record)
    all_on = layer_switches.switch_feed(switches, [r.name for r in switches])
    all_off = layer_switches.switch_feed(switches, [])
    weights = [r for r in unique if r.kind == "weight"]
    activations = [r for r in unique if r.kind == "activation"]
    per_layer = {}
    if weights:
        values = sess.run([(r.float_tensor, r.quantized_tensor) for r in weights], feed_dict=all_on)
        for record, (x, q) in zip(weights, values):
            layout = weight_layouts.get(record.name, GroupLayout())
            per_layer[record.name] = weight_fidelity(x, q, layout, record.bits)
    # Pass 1: each activation's observed range (the histogram's bins) over all chunks, reduced in the graph, and
    # its levels (hence its step) from a sample of the first chunk, so only small arrays leave the session.
    levels = {r.name: set() for r in activations}
    extremes = {r.name: [math.inf, -math.inf] for r in activations}
    with sess.graph.as_default():
        reductions = [(tf.reduce_min(r.float_tensor), tf.reduce_max(r.float_tensor)) for r in activations]
    for index, feed in enumerate(feeds):
        fetched = sess.run([reductions, [r.quantized_tensor for r in activations] if index == 0 else []],
                           feed_dict={**feed, **all_on})
        for record, (low, high) in zip(activations, fetched[0]):
            extremes[record.name][0] = min(extremes[record.name][0], float(low))
            extremes[record.name][1] = max(extremes[record.name][1], float(high))
        for record, q in zip(activations, fetched[1]):
            levels[record.name].update(np.unique(_sample(q)).tolist())
    bits = {r.name: r.bits for r in activations}
    steps = {name: grid_step(sorted(found), bits[name]) for name, found in levels.items()}
    stats = {r.name: TensorStats() for r in activations}
    counts = {r.name: np.zeros(HISTOGRAM_BINS, np.int64) for r in activations}
    # Pass 2: errors, histograms, and every layer's output in the quantized and in the float network.
    outputs = []
    for record in switches:
        if all(record.layer_output is not other for other in outputs):
            outputs.append(record.layer_output)
    accumulated = [[0.0, 0.0] for _ in outputs]
    final = {"signal": 0.0, "noise": 0.0, "agree": 0, "count": 0}
    for feed in feeds:
        fetches = [[(r.float_tensor, r.quantized_tensor) for r in activations], outputs]
        if final_tensor is not None:
            fetches.append(final_tensor)
        quantized_run = sess.run(fetches, feed_dict={**feed, **all_on})
        float_run = sess.run(fetches[1:], feed_dict={**feed, **all_off})
        for record, (x, q) in zip(activations, quantized_run[0]):
            stats[record.name].add(x, q, steps[record.name])
            counts[record.name] += histogram(x, *extremes[record.name])
        for sums, quantized, reference in zip(accumulated, quantized_run[1], float_run[0]):
            reference = np.asarray(reference, np.float64).reshape(-1)
            difference = reference - np.asarray(quantized).reshape(-1)
            sums[0] += float(np.dot(reference, reference))
            sums[1] += float(np.dot(difference, difference))
        if final_tensor is not None:
            quantized, reference = np.asarray(quantized_run[2], np.float64), np.asarray(float_run[1], np.float64)
            final["signal"] += float(np.sum(reference ** 2))
            final["noise"] += float(np.sum((reference - quantized) ** 2))
            final["agree"] += int(np.sum(np.argmax(quantized, -1) == np.argmax(reference, -1)))
            final["count"] += len(reference)
    for record in activations:
        entry = stats[record.name].record()
        entry["histogram"] = {"range": [rounded(v) for v in extremes[record.name]],
                              "counts": [int(c) for c in counts[record.name]]}
        entry.update(_levels_entry(sorted(levels[record.name])))
        per_layer[record.name] = entry
    output_sqnr = {id(t): _ratio_db(*sums) for t, sums in zip(outputs, accumulated)}
    layers = []
    for record in switches:
        source = next(r for r in unique if r.quantized_tensor is record.quantized_tensor)
        entry = {"name": record.name, "kind": record.kind, "bits": record.bits, **per_layer[source.name],
                 "output_sqnr_db": output_sqnr[id(record.layer_output)]}
        layers.append(entry)
    summary = None
    if final_tensor is not None and final["count"]:
        summary = {"sqnr_db": _ratio_db(final["signal"], final["noise"]), "examples": final["count"],
                   "top1_agreement": rounded(final["agree"] / final["count"])}
    return {"layers": layers, "output": summary}


def _ratio_db(signal, noise):
    if noise == 0.0 or signal == 0.0:
        return None
    return rounded(10.0 * math.log10(signal / noise))
