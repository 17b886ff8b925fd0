"""Sensitivity of a float model to quantizing one tensor: the measured loss increase on fixed batches.

For a weight W and b bits, the loss is evaluated with Q_b(W) fed in place of W's value (every other tensor
float), Q_b being the run's own weight grid as training starts on it (tfquant.weight_grids; LSQ at its initial
steps), so the allocation is chosen for the quantizer the run trains; for an activation, its value on the batch is
quantized with the batch's own min/max (the training graph's range) and fed in place of the activation's output.
The sensitivity is the mean increase over the batches. Feeding replaces a tensor for one run only, so the model's
variables are never modified and the float graph stays usable; the only ops added are quantizers (one per weight
shape, range groups and width, shared by the weights alike in those; one per activation width), under SCOPE.

Where the time goes (ResNet-20, W2 A2.5, one batch of 128, profiled): about nine tenths of the CPU is the loss runs,
one per target and width, each computing the network below its target only; they are compute-bound (a forward pass of
896 examples costs the same per example as seven of 128), so only fewer runs or fewer examples cut them. Fewer
examples change the chosen bits (even the first 120 of the 128, on each of three seeds): the best allocation is
within 0 to 0.0016 of the next one's summed sensitivity, less than a few examples move the values. Fewer runs do not,
if the wider widths are estimated rather than left out: there the quantization error is small, and g.(Q_b(x) - x),
with g the loss gradient from one forward and backward pass, is within 2e-5 to 5e-5 of the measured increase at the
median (values about 3e-4; at worst 2e-3 for a weight at 5 or more bits, 0.1 for the first ReLU at 4 bits), while the
narrow widths, where the loss is far from linear in the error, keep their loss runs (measure's measured_widths).
Measuring the narrowest 4 weight and 2 activation widths keeps the bits of every budget of benchmarks.bit_allocation
on three seeds (benchmarks.bit_search_estimates) at 4.5 % of a fine-tuning epoch's multiply-accumulates at W2 A2.5
when the gradients had a pass of their own (about 4.4 % with them from the float pass, one forward pass of the
epoch's 1,407 fewer), against 10.6 % for a loss run at every width. Of a run's op time, convolutions take three quarters, the residual
adds, batch norms and ReLUs the rest: grappler's remapper made the runs a fifth cheaper once a feed signature was
optimized, but optimizing each of the ~40 signatures cost more than that (hence grappler off); optimizing the graph
once, every fed tensor kept, fused only batch norm with ReLU (a twentieth) and moved losses by 3e-5. Leaving out the
widest widths changed the chosen bits (7 and 8: on seed 1's batches the stride-2 shortcut took 7 bits). Nor can
the estimates replace any further loss run: loss-running a width of the default's only where its estimate is above a
threshold changed seed 1's W3 bits even when it left out 12 of the 1,416 runs of four budgets and three seeds (any
threshold from 1e-2 to 1e-4), and 3 weight or 1 activation narrowest widths changed bits too. What is left besides
the loss runs is one float pass per batch, forward and backward (the loss, the values fed back, the gradients), and
one run per activation giving its measured widths' values and its estimates (g.(Q_b(x) - x) summed in the session:
copying every width out and summing in NumPy, as a second pass did, cost a tenth of the search).
benchmarks.bit_search_check checks this measurement and its allocations against brute force.
"""
import collections
import concurrent.futures
import dataclasses
from typing import List, Optional

import numpy as np
import tensorflow as tf

from tfquant import match, ops, policy, weight_grids
from tfquant.config import match_override

tf1 = tf.compat.v1
SCOPE = "tfquant_sensitivity"
WEIGHT = "weight"
ACTIVATION = "activation"
# Loss runs in flight at once: one run of a small model leaves cores idle between its ops (on 2 cores, ResNet-20's
# search: 2 runs 7.9-8.0 s, 3 runs 7.5-7.6 s, 4 runs 7.8 s).
PARALLEL_RUNS = 3
# Runs queued beyond those in flight: enough to cover preparing the next target's values, few enough that only a
# couple of targets' quantized values (an activation at every width) are held at once.
PENDING_RUNS = 2 * PARALLEL_RUNS
# Float values of one batch held at once (activations, tensors fed back): beyond this the float pass is run
# again for the next targets (a large model's activations of a batch can take gigabytes; a small model's fit
# in one run).
FLOAT_VALUE_BYTES = 256 * 2 ** 20


@dataclasses.dataclass
class Target:
    """A tensor whose quantization is measured.

    Attributes:
      name: the weight variable's name, or the activation op's name.
      kind: WEIGHT or ACTIVATION.
      op_names: the ops whose bits it decides (several matmul-like ops may read one variable).
      tensors: the tensors replaced by the quantized value (the weights as those ops read them, or the
        activation's output).
      size: elements of the weight, or of the activation per example.
      layout: the weight's range groups (ops.GroupLayout); None for activations.
      grid: the weight's WeightGrid (None: the min/max grid); None for activations.
    """

    name: str
    kind: str
    op_names: List[str]
    tensors: List[tf.Tensor]
    size: int
    layout: Optional[ops.GroupLayout] = None
    grid: Optional[weight_grids.WeightGrid] = None


def find_targets(graph, config):
    """The weights and activations an allocation decides, in data-flow order, following `config`'s rules.

    Weights: every quantizable matmul-like layer except the first and last unless config.quantize_all_layers
    (those stay float and outside any budget); layers reading one variable form one target. Activations:
    every activation op whose output is consumed.

    Args:
      graph: the float model's tf.Graph (not rewritten by tfquant).
      config: a QuantConfig (weight grid, buckets and the first/last rule).
    Returns:
      (weight targets, activation targets).
    Raises:
      ValueError: a target's shape is not static.
    """
    depths = match.data_flow_depths(graph)
    eligible = [c for c in match.find_weight_candidates(graph, depths) if not c.skip_reason]
    # The policy's first/last rule: those layers stay float and outside any budget.
    eligible = [c for position, c in enumerate(eligible)
                if not policy.kept_float_as_first_or_last(position, len(eligible), config)]
    weights, grids = {}, {}
    for candidate in eligible:
        target = weights.get(candidate.variable_name)
        if target is None:
            shape = candidate.weight.shape
            if not shape.is_fully_defined():
                raise ValueError("weight %s has shape %s; expected a static shape" % (candidate.variable_name, shape))
            # The grid and buckets the run trains this layer on: an override's, else the config's.
            setting, _ = match_override(config.weight_overrides, candidate.variable_name)
            grid_name = setting.grid if setting is not None and setting.grid else config.weight_grid
            # One grid object per name: weights of one shape, layout and grid share their quantizer ops.
            grid = grids.setdefault(grid_name, weight_grids.GRIDS[grid_name]())
            target = weights[candidate.variable_name] = Target(
                candidate.variable_name, WEIGHT, [], [], int(np.prod(shape.as_list())),
                config.layer_layout(candidate.channel_axes, setting), grid)
        target.op_names.append(candidate.op.name)
        target.tensors.append(candidate.weight)
    activations = []
    for op in match.find_activations(graph, depths):
        output = op.outputs[0]
        if not any(not match.is_untouchable(c) for c in output.consumers()):
            continue
        per_example = output.shape[1:]
        if not per_example.is_fully_defined():
            raise ValueError("activation %s has shape %s; expected a static shape after the batch axis"
                             % (op.name, output.shape))
        activations.append(Target(op.name, ACTIVATION, [op.name], [output], int(np.prod(per_example.as_list()))))
    return list(weights.values()), activations


class _Quantizers:
    """Quantizer ops, one output per width, built in the model's graph before the first run: one per distinct
    (weight shape, range groups, grid), shared by the weights that have them (a ResNet's twenty weights have six
    shapes: building a quantizer per weight took a tenth of the search), and one shared by the activations, run
    for one activation at a time (its values at every width are as large as the activation times the widths),
    with its first-order estimate at the widths in `estimated` (activation widths some target estimates)."""

    def __init__(self, graph, targets, bit_widths, estimated=()):
        self.built = {}
        with graph.as_default(), tf1.name_scope(SCOPE + "/"):
            for target in targets:
                if target.kind == WEIGHT and _weight_key(target) not in self.built:
                    value = tf1.placeholder(tf.float32, target.tensors[0].shape)
                    grid = target.grid or weight_grids.MinMaxGrid()
                    self.built[_weight_key(target)] = (value, grid.initial_widths(value, bit_widths[WEIGHT],
                                                                                  target.layout))
            if any(target.kind == ACTIVATION for target in targets):
                value = tf1.placeholder(tf.float32)
                low, high = tf.reduce_min(value), tf.reduce_max(value)
                self.built[ACTIVATION] = (value, {bits: ops.quantize_in_range(value, bits, low, high)
                                                  for bits in bit_widths[ACTIVATION]})
                # g.(Q_b(x) - x) beside the quantized values, so an estimated width's value never leaves the
                # session (copying every width of an activation out took more than quantizing it). In float32: in
                # float64 the casts took longer than quantizing, for estimates that agree to 1e-6.
                if estimated:
                    self.gradient = tf1.placeholder(tf.float32)
                    self.first_order = {bits: tf.reduce_sum(self.gradient * (self.built[ACTIVATION][1][bits] - value))
                                        for bits in estimated}

    def run(self, sess, values):
        """{target name: {bits: value quantized as the target is at that width}} for [(target, value)] (any
        number of weights, or one activation): one run per weight sharing a quantizer, each run quantizing one
        weight of every (shape, groups, grid)."""
        rounds = []
        for target, value in values:
            key = _weight_key(target) if target.kind == WEIGHT else ACTIVATION
            free = next((r for r in rounds if key not in r), None)
            if free is None:
                if key == ACTIVATION and rounds:
                    raise ValueError("activations share one quantizer; expected one activation per run")
                free = {}
                rounds.append(free)
            free[key] = (target.name, value)
        quantized = {}
        for used in rounds:
            placeholders = {key: self.built[key] for key in used}
            quantized.update(sess.run({used[key][0]: placeholders[key][1] for key in used},
                                      {placeholders[key][0]: used[key][1] for key in used}))
        return quantized

    def activation(self, sess, target, value, widths, gradient=None, estimated=()):
        """({bits: value quantized} for `widths`, {bits: g.(Q_b(value) - value)} for `estimated`, g being
        `gradient`) of the activation `target`'s float value, in one run."""
        placeholder, quantized = self.built[ACTIVATION]
        feed = {placeholder: value}
        if estimated:
            feed[self.gradient] = gradient
        return sess.run({target.name: ({bits: quantized[bits] for bits in widths},
                                       {bits: self.first_order[bits] for bits in estimated})}, feed)[target.name]


def _weight_key(target):
    """What makes two weights' quantizers the same ops: shape, range groups and grid."""
    return (tuple(target.tensors[0].shape.as_list()), target.layout, id(target.grid))


def _cut_tensors(target, upstream_of_loss, batch_dependent):
    """Tensors whose values, fed from the unquantized run, let the loss be recomputed below the target alone.

    The ops the replaced tensors reach (on the way to the loss, among `upstream_of_loss`) are the only ones
    whose values change; every other input they read that depends on the batch (in `batch_dependent`: a
    residual branch, the labels) is fed as it was, so a run computes the network below the target only, with
    the same numbers as a full forward pass.
    """
    # Walked within the ops on the way to the loss only (an op off that way never leads back onto it: whatever
    # reads it is off it too); the gradient and quantizer ops read the same tensors and would multiply the walk.
    changed = match.reachable([c for t in target.tensors for c in t.consumers() if c.name in upstream_of_loss],
                              lambda op: [r for r in match.readers(op) if r.name in upstream_of_loss])
    replaced = {t.name for t in target.tensors}
    cut = {}
    for op in changed.values():
        for tensor in op.inputs:
            if tensor.op.name not in changed and tensor.op.name in batch_dependent and tensor.name not in replaced:
                cut[tensor.name] = tensor
    return list(cut.values())


def measure(sess, loss, batches, targets, bit_widths, measured_widths=None):
    """The mean loss increase on `batches` when each target alone is quantized at each width.

    Args:
      sess: a session of the float model's graph, its variables restored (the caller's; never closed here).
      loss: the scalar loss tensor (e.g. mean cross-entropy).
      batches: a list of feed dicts, each fixing one batch of inputs (e.g. {images: ..., labels: ...}).
      targets: Targets from find_targets.
      bit_widths: {target kind: the widths to measure}, e.g. {WEIGHT: range(2, 9)}.
      measured_widths: {target kind: n}: only the n narrowest widths of that kind get loss runs; the wider ones
        are estimated to first order (first_order_increase). None, a kind left out or 0: every width has its run.
    Returns:
      {target name: {bits: mean increase of the loss}} (measured values: may be slightly negative).
    """
    if not batches:
        raise ValueError("batches is empty; expected at least one feed dict")
    run_widths = {t.name: _narrowest(bit_widths[t.kind], (measured_widths or {}).get(t.kind)) for t in targets}
    estimated = {t.name: [bits for bits in bit_widths[t.kind] if bits not in run_widths[t.name]] for t in targets}
    quantizers = _Quantizers(sess.graph, targets, bit_widths,
                             sorted({bits for t in targets if t.kind == ACTIVATION for bits in estimated[t.name]}))
    gradients = _gradients(sess.graph, loss, [t for t in targets if estimated[t.name]])
    weights = [t for t in targets if t.kind == WEIGHT]
    weight_values = dict(zip([t.name for t in weights], sess.run([t.tensors[0] for t in weights])))
    # A weight's quantized values do not depend on the batch: computed once.
    quantized_weights = quantizers.run(sess, [(t, weight_values[t.name]) for t in weights])
    totals = {t.name: {bits: 0.0 for bits in bit_widths[t.kind]} for t in targets}
    # Every batch feeds the same input tensors, so the cuts are the same for all of them.
    upstream_of_loss = match.reachable([loss.op], lambda op: [t.op for t in op.inputs] + list(op.control_inputs))
    batch_dependent = match.reachable([t.op for t in batches[0] if isinstance(t, tf.Tensor)], match.readers)
    cuts = {t.name: _cut_tensors(t, upstream_of_loss, batch_dependent) for t in targets}
    # What each target needs from the float pass: its own value (an activation), the tensors fed back to its loss
    # runs and, where widths are estimated, its gradients: one forward and backward pass gives all of them.
    needs = {t.name: ([t.tensors[0]] if t.kind == ACTIVATION else []) + cuts[t.name]
             + ([gradients[x.name] for x in t.tensors] if estimated[t.name] else []) for t in targets}
    for feed in batches:
        base_loss = None
        with concurrent.futures.ThreadPoolExecutor(PARALLEL_RUNS) as pool:
            # Runs are queued across a group's targets, so the pool does not drain while the next target's quantized
            # values are prepared; a bounded queue keeps only a few targets' quantized values alive at once.
            pending = collections.deque()
            for group in _groups(targets, needs, _examples(feed), FLOAT_VALUE_BYTES):
                # One float run per group: the float loss (first group) and the values the group's runs need.
                fetch = list({t.name: t for target in group for t in needs[target.name]}.values())
                fetched = sess.run(([loss] if base_loss is None else []) + fetch, feed)
                if base_loss is None:
                    base_loss, fetched = fetched[0], fetched[1:]
                values = dict(zip([t.name for t in fetch], fetched))
                del fetched  # dropped with the group
                for target in group:
                    widths = estimated[target.name]
                    if target.kind == WEIGHT:
                        quantized = quantized_weights[target.name]
                        first_order = _weight_first_order(target, weight_values[target.name], quantized, widths,
                                                          values, gradients)
                    else:
                        quantized, first_order = quantizers.activation(
                            sess, target, values[target.tensors[0].name], run_widths[target.name],
                            values[gradients[target.tensors[0].name].name] if widths else None, widths)
                    for bits, increase in first_order.items():
                        totals[target.name][bits] += float(increase)
                    cut = dict(feed)
                    cut.update({tensor: values[tensor.name] for tensor in cuts[target.name]})
                    for bits in run_widths[target.name]:
                        fed = dict(cut)
                        fed.update({tensor: quantized[bits] for tensor in target.tensors})
                        pending.append((target.name, bits, pool.submit(sess.run, loss, fed)))
                        while len(pending) > PENDING_RUNS:
                            _add_increase(totals, pending.popleft(), base_loss)
                # The group's runs finish before the next float run, so one group's values are alive at a time.
                while pending:
                    _add_increase(totals, pending.popleft(), base_loss)
    return {name: {bits: total / len(batches) for bits, total in by_bits.items()}
            for name, by_bits in totals.items()}


def _gradients(graph, loss, targets):
    """{tensor name: d loss / d tensor} for the tensors of `targets` (ValueError where the loss does not depend on
    one)."""
    if not targets:
        return {}
    with graph.as_default(), tf1.name_scope(SCOPE + "/"):
        tensors = list({t.name: t for target in targets for t in target.tensors}.values())
        gradients = dict(zip([t.name for t in tensors], tf.gradients(loss, tensors)))
    missing = [t.name for t in tensors if gradients[t.name] is None]
    if missing:
        raise ValueError("the loss does not depend on %s; expected targets on the way to the loss" % missing)
    return gradients


def _weight_first_order(target, value, quantized, widths, values, gradients):
    """{bits: g.(Q_b(w) - w) for bits in `widths`} of a weight, summed over the tensors it is read as (their
    gradients' values in `values`)."""
    result = {}
    for bits in widths:
        change = (quantized[bits] - value).astype(np.float64)
        result[bits] = sum(float(np.sum(values[gradients[x.name].name] * change)) for x in target.tensors)
    return result


def first_order_increase(sess, loss, batches, targets, quantizers, weight_values, quantized_weights):
    """{target name: {bits: mean over `batches` of g . (Q_b(x) - x)}}: the loss increase to first order, g being the
    loss gradient at the float value x (summed over the tensors a weight is read as).

    One forward and backward pass per batch and group of targets gives every target's gradient; quantizing a
    tensor is elementwise, so no width adds a matmul. Close to the measured increase where Q_b(x) - x is small (the
    wider widths), not at the narrow ones, where the loss is far from linear in the perturbation. measure computes
    the same estimates within its float pass; this is the estimate alone, on its own passes.
    """
    gradients = _gradients(sess.graph, loss, targets)
    # What each target's estimate needs from the float pass: its gradients and (an activation) its value.
    needs = {t.name: [gradients[x.name] for x in t.tensors] + ([t.tensors[0]] if t.kind == ACTIVATION else [])
             for t in targets}
    totals = {t.name: collections.defaultdict(float) for t in targets}
    for feed in batches:
        for group in _groups(targets, needs, _examples(feed), FLOAT_VALUE_BYTES):
            fetch = list({t.name: t for target in group for t in needs[target.name]}.values())
            values = dict(zip([t.name for t in fetch], sess.run(fetch, feed)))
            for target in group:
                value = (weight_values[target.name] if target.kind == WEIGHT else values[target.tensors[0].name])
                quantized = (quantized_weights[target.name] if target.kind == WEIGHT else
                             quantizers.run(sess, [(target, value)])[target.name])
                for bits, replaced in quantized.items():
                    change = (replaced - value).astype(np.float64)
                    totals[target.name][bits] += sum(float(np.sum(values[gradients[x.name].name] * change))
                                                     for x in target.tensors)
    return {name: {bits: total / len(batches) for bits, total in by_bits.items()} for name, by_bits in totals.items()}


def _narrowest(widths, count):
    """The `count` narrowest of `widths` (all of them when count is None or 0)."""
    return sorted(widths)[:count] if count else list(widths)


def _add_increase(totals, run, base_loss):
    """Add a finished run's (target name, bits, future of its loss) increase over the float loss to `totals`."""
    name, bits, future = run
    totals[name][bits] += float(future.result()) - float(base_loss)


def _examples(feed):
    """The number of examples a feed dict holds (the first axis of its first array that has one)."""
    return next((len(value) for value in feed.values() if np.ndim(value) >= 1), 1)


def _float_bytes(tensor, examples):
    """Bytes of a float32 tensor's value for `examples` examples (unknown per-example sizes count as one)."""
    per_example = tensor.shape[1:]
    size = int(np.prod(per_example.as_list())) if per_example.is_fully_defined() else 1
    return 4 * size * examples


def _groups(targets, needs, examples, limit):
    """Consecutive targets in groups whose needed float values (`needs`) take at most `limit` bytes together (a
    target needing more alone forms its own group)."""
    groups, held = [], {}
    for target in targets:
        added = {t.name: _float_bytes(t, examples) for t in needs[target.name] if t.name not in held}
        if not groups or sum(held.values()) + sum(added.values()) > limit:
            groups.append([])
            held = {t.name: _float_bytes(t, examples) for t in needs[target.name]}
        else:
            held.update(added)
        groups[-1].append(target)
    return groups


def non_increasing(sensitivities):
    """Each width's sensitivity raised to the largest at any wider width, so more bits never look worse.

    Measured increases at wide widths are noise of either sign; without this the solver could prefer
    a narrower width for a layer because of that noise.

    Args:
      sensitivities: {bits: value}.
    Returns:
      {bits: max(value at bits, values at every wider width, 0)}.
    """
    result, running = {}, 0.0
    for bits in sorted(sensitivities, reverse=True):
        running = max(running, sensitivities[bits])
        result[bits] = running
    return result


def checked_widths(low, high):
    """The widths low..high as a list; ValueError unless 1 <= low <= high <= 16 (float is no candidate)."""
    if not (1 <= low <= high <= 16):
        raise ValueError("bit range %r..%r is not valid; expected 1 <= min <= max <= 16" % (low, high))
    return list(range(low, high + 1))
