"""Low-bit training recipes of quantized fine-tuning (issue 34), each off unless asked for.

- A separate optimizer for the learned ranges (LSQ step sizes and offsets, PACT clip levels): they leave the
  weights' Momentum optimizer and weight decay and train with their own optimizer and learning rate.
- Weight decay scaled at <= 2 bits: the decay of every weight whose layer has at most 2-bit weights is
  multiplied by a factor (a 2-bit grid has 4 levels; full decay pulls its weights into the middle ones).
- Oscillation tracking and freezing (Nagel et al., 2022), in tfquant.oscillation; wired in here.

graphs.build_graph asks this module for the loss and the training step, so a graph without recipes is built
exactly as before.
"""
import dataclasses
from typing import Callable, Optional

import tensorflow as tf

import tfquant
from learners.errors import UserError
from tfquant import oscillation, weight_grids

tf1 = tf.compat.v1
RANGE_OPTIMIZERS = ("shared", "adam", "momentum", "sgd")
LOW_BITS = 2  # layers with at most this many weight bits get the scaled decay


@dataclasses.dataclass(frozen=True)
class Recipes:
    """Which recipes a training graph uses.

    Attributes:
      range_optimizer: 'shared' (the learned ranges train with the weights' optimizer and decay, as before),
        or 'adam' / 'momentum' / 'sgd': their own optimizer, without weight decay.
      range_lrn_rate_fn: global_step -> (the range optimizer's learning rate, nb_iters), as
        graphs.cosine_lrn_rate makes (with a separate range optimizer).
      momentum: the range optimizer's momentum ('momentum').
      low_bit_decay_scale: None (off), or the factor on the weight decay of weights with <= LOW_BITS bits.
      oscillations: None (off), or a tfquant.oscillation.OscillationSettings.
    """

    range_optimizer: str = "shared"
    range_lrn_rate_fn: Optional[Callable] = None
    momentum: float = 0.9
    low_bit_decay_scale: Optional[float] = None
    oscillations: Optional[oscillation.OscillationSettings] = None

    @property
    def separate_ranges(self):
        """Whether the learned ranges train with an optimizer of their own."""
        return self.range_optimizer != "shared"


NO_RECIPES = Recipes()


def range_variables(graph):
    """The learned range variables of a quantized graph (LSQ steps and offsets, PACT clip levels), by name."""
    return sorted(graph.get_collection(tfquant.ranges.LEARNED_COLLECTION), key=lambda v: v.op.name)


def low_bit_weight_names(report, low_bits=LOW_BITS):
    """Names of the weight variables of quantized layers with at most `low_bits` weight bits."""
    return {layer.weight_variable for layer in report.weight_layers
            if layer.quantized and layer.bits <= low_bits and layer.weight_variable}


def model_loss(helper, labels, logits, trainable, report, recipes):
    """helper.calc_loss with the recipes' weight decay: ranges without decay, <= 2-bit weights' decay scaled.

    A helper's decay is a sum over the variables it is given (PocketFlow's loss_w_dcy * sum l2_loss over those it
    decays), so the decay of the low-bit weights alone is calc_loss(low) - calc_loss([]); it is computed on logits
    without gradient, so the cross-entropy's gradient is the helper's own, once.
    Args:
      helper: the ModelHelper.
      labels, logits: the batch's labels and (quantized) logits.
      trainable: the trainable variables a helper would decay.
      report: the QuantReport, or None (float graph).
      recipes: a Recipes.
    Returns:
      (loss, metrics) as helper.calc_loss returns them.
    """
    if report is None or recipes is None:
        return helper.calc_loss(labels, logits, trainable)
    if recipes.separate_ranges:
        excluded = {v.op.name for v in range_variables(logits.graph)}
        trainable = [v for v in trainable if v.op.name not in excluded]
    if recipes.low_bit_decay_scale is None:
        return helper.calc_loss(labels, logits, trainable)
    low = low_bit_weight_names(report)
    high_bit = [v for v in trainable if v.op.name not in low]
    low_bit = [v for v in trainable if v.op.name in low]
    loss, metrics = helper.calc_loss(labels, logits, high_bit)
    if low_bit:
        logits_no_gradient = tf.stop_gradient(logits)
        with tf1.name_scope("low_bit_weight_decay"):
            with_low, _ = helper.calc_loss(labels, logits_no_gradient, low_bit)
            without, _ = helper.calc_loss(labels, logits_no_gradient, [])
            decay = recipes.low_bit_decay_scale * (with_low - without)
        loss = loss + decay
        metrics = dict(metrics, loss=loss, low_bit_weight_decay=decay)
    return loss, metrics


def minimize(optimizer, loss, global_step, graph, recipes):
    """The training step: `optimizer` on every trainable variable, or, with a separate range optimizer, on all but
    the learned ranges, which the range optimizer updates from the same gradients (one backward pass).

    Returns:
      (train op, {name: extra tensor}: the range optimizer's learning rate when there is one).
    """
    if recipes is None or not recipes.separate_ranges:
        return optimizer.minimize(loss, global_step=global_step), {}
    ranges = range_variables(graph)
    names = {v.op.name for v in ranges}
    weights = [v for v in tf1.trainable_variables() if v.op.name not in names]
    pairs = optimizer.compute_gradients(loss, var_list=weights + ranges)
    weight_pairs = [(g, v) for g, v in pairs if v.op.name not in names and g is not None]
    range_pairs = [(g, v) for g, v in pairs if v.op.name in names and g is not None]
    range_lrn_rate = recipes.range_lrn_rate_fn(global_step)[0]
    range_optimizer = make_range_optimizer(recipes.range_optimizer, range_lrn_rate, recipes.momentum)
    updates = [optimizer.apply_gradients(weight_pairs, global_step=global_step)]
    if range_pairs:
        updates.append(range_optimizer.apply_gradients(range_pairs))
    return tf.group(*updates, name="train_op"), {"range_lrn_rate": range_lrn_rate}


def track_oscillations(train_op, graph, report, recipes):
    """(train op that also updates the oscillation state after the optimizer step, its OscillationTracker), or
    (train_op, None) without oscillation tracking."""
    if report is None or recipes is None or recipes.oscillations is None:
        return train_op, None
    grid = weight_grids.for_config(report.config)
    tracker = oscillation.build_tracker(graph, report, grid, tfquant.report.layer_layout, recipes.oscillations)
    return tracker.update(train_op), tracker


def summaries(extra):
    """TensorBoard scalars of the recipes in a training graph's ModelGraph.extra: the range optimizer's learning
    rate, and the fraction of oscillating (and of frozen) weights over every tracked weight."""
    scalars = []
    if "range_lrn_rate" in extra:
        scalars.append(tf1.summary.scalar("range_lrn_rate", extra["range_lrn_rate"]))
    tracker = extra.get("oscillation")
    if tracker is not None and tracker.weights:
        statistics = list(tracker.statistics().values())
        total = tf.cast(tf.add_n([s["weights"] for s in statistics]), tf.float32)
        for name in ("oscillating", "frozen"):
            count = tf.cast(tf.add_n([s[name] for s in statistics]), tf.float32)
            scalars.append(tf1.summary.scalar("oscillation/%s_fraction" % name, count / total))
    return scalars


def make_range_optimizer(kind, lrn_rate, momentum):
    """The tf.compat.v1 optimizer of the learned ranges ('adam', 'momentum' or 'sgd'), named apart from the weights'."""
    if kind == "adam":
        return tf1.train.AdamOptimizer(lrn_rate, name="RangeAdam")
    if kind == "momentum":
        return tf1.train.MomentumOptimizer(lrn_rate, momentum, name="RangeMomentum")
    if kind == "sgd":
        return tf1.train.GradientDescentOptimizer(lrn_rate, name="RangeSGD")
    raise ValueError("range optimizer %r is not known; expected one of %s" % (kind, ", ".join(RANGE_OPTIMIZERS)))


def from_settings(settings, nb_iters, lrn_rate_schedule):
    """The Recipes the flags ask for.

    Args:
      settings: the parsed flags.
      nb_iters: fine-tuning iterations (the range optimizer's schedule spans them).
      lrn_rate_schedule: (initial rate, nb_iters) -> lrn_rate_fn, the fine-tuning schedule (cosine decay).
    """
    kind = getattr(settings, "uql_range_optimizer", "shared") or "shared"
    scale = getattr(settings, "uql_low_bit_weight_decay_scale", None)
    threshold = getattr(settings, "uql_freeze_oscillations", None)
    track = bool(getattr(settings, "uql_track_oscillations", False)) or threshold is not None
    return Recipes(
        range_optimizer=kind,
        range_lrn_rate_fn=(lrn_rate_schedule(settings.uql_range_lrn_rate, nb_iters) if kind != "shared" else None),
        momentum=settings.momentum, low_bit_decay_scale=scale,
        oscillations=oscillation.OscillationSettings(freeze_threshold=threshold) if track else None)


def check_recipes(recipes, config, cluster):
    """Refuse recipes this run cannot apply (before training starts), with one line naming the flag."""
    if recipes.oscillations is not None and config.fold_batch_norms:
        raise UserError("--uql_track_oscillations / --uql_freeze_oscillations are not valid with "
                        "--uql_fold_batch_norms; expected them without folding (the folded weight is not a variable "
                        "whose codes can be tracked or frozen)")
    if cluster is not None and (recipes.separate_ranges or recipes.oscillations is not None):
        raise UserError("--uql_range_optimizer and the oscillation flags are not available with several workers; "
                        "expected a single-process run")


def results_entries(sess, model, training_recipes):
    """results.json entries of the recipes a finished training graph used ({} without any)."""
    entries = {}
    if training_recipes is None or model.report is None:
        return entries
    if training_recipes.separate_ranges:
        entries["range_optimizer"] = {"optimizer": training_recipes.range_optimizer,
                                      "variables": [v.op.name for v in range_variables(model.graph)]}
    if training_recipes.low_bit_decay_scale is not None:
        entries["low_bit_weight_decay"] = {"scale": training_recipes.low_bit_decay_scale, "max_bits": LOW_BITS,
                                           "weights": sorted(low_bit_weight_names(model.report))}
    tracker = model.extra.get("oscillation")
    if tracker is not None:
        entries["oscillation"] = oscillation.summarize(sess.run(tracker.statistics()), training_recipes.oscillations)
    return entries


def summary_lines(results):
    """The lines a uniform run prints about its recipes (none without them)."""
    lines = []
    if "low_bit_weight_decay" in results:
        entry = results["low_bit_weight_decay"]
        lines.append("low-bit weight decay: x%g on %d weight(s) with <= %d bits"
                     % (entry["scale"], len(entry["weights"]), entry["max_bits"]))
    if "oscillation" in results:
        entry = results["oscillation"]
        lines.append("oscillating weights: %.2f %% (%d of %d above %g reversals/step), frozen %.2f %% (%d)"
                     % (100.0 * entry["oscillating_fraction"], entry["oscillating"], entry["weights"],
                        entry["report_threshold"], 100.0 * entry["frozen_fraction"], entry["frozen"]))
    return lines
