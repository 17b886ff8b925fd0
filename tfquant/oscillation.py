"""Weight oscillations in quantized training (Nagel et al., ICML 2022, "Overcoming oscillations in QAT").

A latent weight near the boundary between two levels can flip its integer code back and forth from step to step.
After every training step the tracker reads each quantized weight's codes (its grid's own `codes`, with a learned
grid's trained steps) and keeps, per weight:

  change    c_t = code_t - code_{t-1}
  o_t       1 when c_t != 0 and its sign is opposite to the sign of the last non-zero change, else 0
  frequency f_t = m * o_t + (1 - m) * f_{t-1}   (an EMA of oscillations per step, m = `momentum`)
  code EMA  e_t = m * code_t + (1 - m) * e_{t-1}

The first observation only records the codes (f stays 0, e starts at the code). With a freeze threshold, a weight
whose frequency exceeds it is frozen from then on to round(e) (its EMA-rounded code): after every step its latent
value is written back to that code's level of the grid as it stands after the step, so every later forward pass,
the checkpoint and any export read the frozen code (the write-back is a point of the grid, which the grid's rounding
maps to that code).
"""
import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf

from tfquant import ops

tf1 = tf.compat.v1
SCOPE_SUFFIX = "_oscillation"
DEFAULT_MOMENTUM = 0.01
# A weight counts as oscillating in the report when its frequency exceeds this (without a freeze threshold):
# about one reversal every 100 steps, sustained.
DEFAULT_REPORT_THRESHOLD = 0.01


@dataclasses.dataclass(frozen=True)
class OscillationSettings:
    """momentum: EMA factor m; freeze_threshold: None (measure only) or the frequency above which a weight is
    frozen; the report counts weights above freeze_threshold, or DEFAULT_REPORT_THRESHOLD without one."""

    momentum: float = DEFAULT_MOMENTUM
    freeze_threshold: Optional[float] = None

    def __post_init__(self):
        if not 0 < self.momentum <= 1:
            raise ValueError("momentum=%r is not valid; expected a number in (0, 1]" % (self.momentum,))
        if self.freeze_threshold is not None and not 0 < self.freeze_threshold < 1:
            raise ValueError("freeze_threshold=%r is not valid; expected a number in (0, 1)" % (self.freeze_threshold,))

    @property
    def report_threshold(self):
        """The frequency above which the report counts a weight as oscillating."""
        return self.freeze_threshold if self.freeze_threshold is not None else DEFAULT_REPORT_THRESHOLD


def decode_codes(codes, alpha, beta, bits, layout):
    """codes * (alpha * float32(1/(2^k-1))) + beta of each range group of `layout`, in the codes' shape.

    Args:
      codes: int or float tensor of the weight's shape.
      alpha, beta: float [groups], as a grid's `codes` returns them.
      bits: the code width.
      layout: the GroupLayout the codes were made with.
    """
    view, reduce_axes, restore = ops.grouped(tf.cast(codes, tf.float32), layout)
    if reduce_axes is None:
        group_shape = []
    else:
        group_shape = [1 if axis in reduce_axes else int(dim) for axis, dim in enumerate(view.shape.as_list())]
    scale = tf.reshape(ops.dequantize_scale(alpha, bits), group_shape)
    return restore(view * scale + tf.reshape(beta, group_shape))


class WeightOscillation:
    """The oscillation state of one quantized weight variable and the ops that update (and freeze) it."""

    def __init__(self, variable, codes_fn, decode_fn, settings):
        """variable: the weight variable; codes_fn: () -> (int32 codes, alpha, beta) of its current value;
        decode_fn: (codes, alpha, beta) -> values; settings: OscillationSettings."""
        self.variable = variable
        self.settings = settings
        shape = variable.shape.as_list()
        with tf1.variable_scope(variable.op.name + SCOPE_SUFFIX, reuse=tf1.AUTO_REUSE):
            def state(name, dtype):
                return tf1.get_variable(name, shape=shape, dtype=dtype, initializer=tf1.zeros_initializer(),
                                        trainable=False, use_resource=True)
            self.previous_codes = state("previous_codes", tf.int32)
            self.last_direction = state("last_direction", tf.int32)
            self.frequency = state("frequency", tf.float32)
            self.code_ema = state("code_ema", tf.float32)
            self.frozen = state("frozen", tf.bool)
            self.frozen_codes = state("frozen_codes", tf.int32)
            self.steps = tf1.get_variable("steps", shape=[], dtype=tf.int64, initializer=tf1.zeros_initializer(),
                                          trainable=False, use_resource=True)
        self._codes_fn = codes_fn
        self._decode_fn = decode_fn

    def update(self):
        """Ops that fold the weight's current codes into the state and, with a threshold, freeze and write back."""
        m = self.settings.momentum
        codes, alpha, beta = self._codes_fn()
        first = tf.equal(self.steps.value(), 0)
        previous, last = self.previous_codes.value(), self.last_direction.value()
        direction = tf.sign(codes - previous)
        moved = tf.logical_and(tf.not_equal(direction, 0), tf.logical_not(first))
        reversed_ = tf.logical_and(moved, tf.equal(direction, -last))
        frequency = tf.where(first, tf.zeros_like(self.frequency),
                             m * tf.cast(reversed_, tf.float32) + (1.0 - m) * self.frequency.value())
        float_codes = tf.cast(codes, tf.float32)
        code_ema = tf.where(first, float_codes, m * float_codes + (1.0 - m) * self.code_ema.value())
        new_last = tf.where(moved, direction, last)
        computed = [codes, alpha, beta, frequency, code_ema, new_last]
        threshold = self.settings.freeze_threshold
        if threshold is not None:
            newly = tf.logical_and(tf.logical_not(self.frozen.value()), frequency > threshold)
            frozen = tf.logical_or(self.frozen.value(), newly)
            frozen_codes = tf.where(newly, tf.cast(tf.round(code_ema), tf.int32), self.frozen_codes.value())
            # The frozen weights' latent values go to their code's level of the grid after this step's update.
            pinned = tf.where(frozen, self._decode_fn(frozen_codes, alpha, beta), self.variable.value())
            computed += [frozen, frozen_codes, pinned]
        # Every write waits for every read (the codes read the weight, the state reads itself): resource variables
        # are otherwise read and written in no fixed order within one step.
        with tf.control_dependencies(computed):
            updates = [self.previous_codes.assign(codes, read_value=False),
                       self.last_direction.assign(new_last, read_value=False),
                       self.frequency.assign(frequency, read_value=False),
                       self.code_ema.assign(code_ema, read_value=False)]
            if threshold is not None:
                updates += [self.frozen.assign(frozen, read_value=False),
                            self.frozen_codes.assign(frozen_codes, read_value=False),
                            self.variable.assign(pinned, read_value=False)]
        with tf.control_dependencies(updates):
            return self.steps.assign_add(1, read_value=False)

    def statistics(self):
        """{name: scalar tensor}: weights, oscillating (frequency above the report threshold), frozen, mean frequency."""
        size = float(np.prod(self.variable.shape.as_list(), dtype=np.int64))
        above = tf.reduce_sum(tf.cast(self.frequency.value() > self.settings.report_threshold, tf.int64))
        return {"weights": tf.constant(int(size), tf.int64), "oscillating": above,
                "frozen": tf.reduce_sum(tf.cast(self.frozen.value(), tf.int64)),
                "mean_frequency": tf.reduce_mean(self.frequency.value())}


class OscillationTracker:
    """WeightOscillation of every quantized weight of a training graph."""

    def __init__(self, weights):
        """weights: {layer name: WeightOscillation}."""
        self.weights = dict(weights)

    def update(self, after):
        """One op running every weight's update once `after` (the optimizer step) has run."""
        with tf.control_dependencies([after]):
            return tf.group(*[w.update() for w in self.weights.values()], name="oscillation_update")

    def statistics(self):
        """{layer name: WeightOscillation.statistics()} for a session to fetch."""
        return {name: w.statistics() for name, w in self.weights.items()}


def summarize(values, settings):
    """A JSON-ready summary of fetched statistics {layer: {name: value}}: totals and per layer."""
    layers = {}
    total = oscillating = frozen = 0
    weighted = 0.0
    for name in sorted(values):
        v = values[name]
        n = int(v["weights"])
        layers[name] = {"weights": n, "oscillating": int(v["oscillating"]), "frozen": int(v["frozen"]),
                        "oscillating_fraction": int(v["oscillating"]) / max(n, 1),
                        "mean_frequency": float(v["mean_frequency"])}
        total += n
        oscillating += int(v["oscillating"])
        frozen += int(v["frozen"])
        weighted += float(v["mean_frequency"]) * n
    return {"momentum": settings.momentum, "report_threshold": settings.report_threshold,
            "freeze_threshold": settings.freeze_threshold, "weights": total, "oscillating": oscillating,
            "oscillating_fraction": oscillating / max(total, 1), "frozen": frozen,
            "frozen_fraction": frozen / max(total, 1), "mean_frequency": weighted / max(total, 1), "layers": layers}


def build_tracker(graph, report, grid, layout_of, settings):
    """An OscillationTracker over the quantized weight layers of `report` in a training graph.

    Args:
      graph: the training graph (the weight and learned-step variables live in it).
      report: its QuantReport.
      grid: the run's WeightGrid (its `codes` are the codes the quantizer uses).
      layout_of: LayerReport -> its GroupLayout (tfquant.report.layer_layout).
      settings: OscillationSettings.
    Returns:
      an OscillationTracker (one entry per weight variable, at its first quantized layer).
    """
    variables = {v.op.name: v for v in graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)}
    weights = {}
    seen = set()
    for layer in report.weight_layers:
        if not layer.quantized or layer.weight_variable in seen or layer.weight_variable not in variables:
            continue
        seen.add(layer.weight_variable)
        variable = variables[layer.weight_variable]
        layout, bits = layout_of(layer), layer.bits
        learned = [variables[name] for name in layer.range_variables or () if name.endswith("lsq_step")]
        step_variable = learned[0] if grid.learned and learned else None

        def codes_fn(variable=variable, bits=bits, layout=layout, step_variable=step_variable):
            # Read here, inside the update's dependency on the optimizer step: the trained steps after it.
            steps = step_variable.value() if step_variable is not None else None
            return grid.codes(variable.value(), bits, layout, steps)

        def decode_fn(codes, alpha, beta, bits=bits, layout=layout):
            return decode_codes(codes, alpha, beta, bits, layout)

        with graph.name_scope(None):
            weights[layer.name] = WeightOscillation(variable, codes_fn, decode_fn, settings)
    return OscillationTracker(weights)
