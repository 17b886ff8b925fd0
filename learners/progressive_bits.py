"""Progressive bit-widths (issue 34): --uql_progressive_bits 8,4,2 trains the uniform learner's fine-tuning first
at 8 bits, then 4, ending at the run's own widths.

How the widths combine with the run's configuration: the run's config (--uql_weight_bits, --uql_activation_bits,
overrides, --uql_layer_bits, --uql_auto_bits) gives every weight layer and activation its final width. In phase p
of width w_p, a quantized layer of final width b trains at max(w_p, b): a phase only widens the layers narrower
than it, never narrows one, and float layers stay float. The last phase is the run's config itself, so its graph,
checkpoint, report, export and storage accounting are exactly those of a run without the flag. The last entry must
equal the run's target width: --uql_weight_bits (--uql_activation_bits when the weights stay float; with
--uql_auto_bits, --uql_w_bit_min).

Schedule: the fine-tuning steps split evenly, phase p starting at step floor(p * nb_iters / phases); the learning-
rate schedules (one cosine over the whole fine-tuning) run on across phases.

Each phase is its own graph (built with that phase's widths, restored from the previous phase's last
checkpoint), so a step costs one quantizer per tensor, never one per width. At a phase start the learned ranges
re-initialise for the new width: their init_steps counters return to 0, so the next step computes LSQ's start
(least-squares step of the current weights, of the current batch for activations) and PACT's clip start at the new
bits, exactly as the run's first step does, and the optimizer slots of those variables return to zero (momentum or
Adam moments gathered at the old width would push the new start along the old width's gradient, whose scale is
2^(k-1) times off). Min/max ranges (weights' max - min, activations' moving averages) do not depend on the width and
carry on; the weights and their own slots carry on too (the weights are what the earlier phases train).
"""
import dataclasses
from typing import Tuple

import tensorflow as tf

import tfquant
from learners.errors import UserError
from tfquant import ranges

tf1 = tf.compat.v1
FLAG = "--uql_progressive_bits"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The phases of a progressive run.

    Attributes:
      widths: the phases' widths, widest first (the last is the run's target).
      nb_iters: fine-tuning steps over all phases.
    """

    widths: Tuple[int, ...]
    nb_iters: int

    @property
    def starts(self):
        """The global step each phase starts at (the first step it runs), as a list."""
        count = len(self.widths)
        return [p * self.nb_iters // count for p in range(count)]

    def end(self, phase):
        """The global step phase `phase` ends at (its last checkpoint's step)."""
        starts = self.starts
        return starts[phase + 1] if phase + 1 < len(starts) else self.nb_iters

    def phase_of(self, step):
        """The phase of the step run when the global step is `step` (the last phase from nb_iters on)."""
        return max(p for p, start in enumerate(self.starts) if start <= min(step, self.nb_iters - 1))

    def at_phase_start(self, step):
        """Whether `step` starts a phase after the first (its ranges re-initialise before it runs)."""
        return step in self.starts[1:]

    @property
    def last(self):
        return len(self.widths) - 1


def parse_widths(entries):
    """The widths of the flag's entries (strings or ints) as a tuple; UserError naming the entry otherwise."""
    widths = []
    for entry in entries:
        try:
            width = int(str(entry).strip())
        except ValueError:
            raise UserError("%s entry %r is not valid; expected a comma-separated list of bit widths such as 8,4,2"
                            % (FLAG, entry)) from None
        if not 2 <= width <= 16:
            raise UserError("%s entry %d is not valid; expected widths from 2 to 16" % (FLAG, width))
        widths.append(width)
    if len(widths) < 2:
        raise UserError("%s=%s is not valid; expected at least two widths, widest first (e.g. 8,4,2)"
                        % (FLAG, ",".join(map(str, widths))))
    if any(later >= earlier for earlier, later in zip(widths, widths[1:])):
        raise UserError("%s=%s is not valid; expected strictly decreasing widths, widest first (e.g. 8,4,2)"
                        % (FLAG, ",".join(map(str, widths))))
    return tuple(widths)


def target_width(settings):
    """(the width the flag's last entry must equal, the flag that sets it) for the parsed flags."""
    if getattr(settings, "uql_auto_bits", False):
        return settings.uql_w_bit_min, "--uql_w_bit_min"
    if settings.uql_weight_bits != tfquant.config.FLOAT_BITS:
        return settings.uql_weight_bits, "--uql_weight_bits"
    return settings.uql_activation_bits, "--uql_activation_bits"


def check_settings(settings):
    """Refuse a --uql_progressive_bits this run cannot use, with one line; returns its widths (None when off)."""
    entries = getattr(settings, "uql_progressive_bits", None) or []
    if not entries:
        return None
    widths = parse_widths(entries)
    text = ",".join(map(str, widths))
    target, flag = target_width(settings)
    if target == tfquant.config.FLOAT_BITS:
        raise UserError("%s=%s is given with float weights and activations; expected --uql_weight_bits or "
                        "--uql_activation_bits below 32" % (FLAG, text))
    if widths[-1] != target:
        raise UserError("%s=%s ends at %d, but %s=%d; expected the last entry to be the run's target width %d"
                        % (FLAG, text, widths[-1], flag, target, target))
    fewest, most = tfquant.config.WEIGHT_GRID_BITS[settings.uql_weight_range]
    if fewest == most:
        raise UserError("%s is not valid with --uql_weight_range=%s, whose grid has one width; expected minmax or "
                        "lsq weights" % (FLAG, settings.uql_weight_range))
    if getattr(settings, "uql_track_oscillations", False) or getattr(settings, "uql_freeze_oscillations", None):
        raise UserError("%s is not valid with --uql_track_oscillations / --uql_freeze_oscillations; expected one "
                        "of them (the oscillation state counts codes of one grid)" % FLAG)
    if getattr(settings, "nb_workers", 1) > 1:
        raise UserError("%s is not available with several workers; expected a single-process run" % FLAG)
    return widths


def check_flags(flags):
    """check_settings on the parsed flags (learners/flags.py), refusing the flag with another learner too."""
    if flags.uql_progressive_bits and flags.learner != "uniform":
        raise UserError("%s is not valid with --learner=%s; expected --learner=uniform (it phases quantized "
                        "fine-tuning)" % (FLAG, flags.learner))
    check_settings(flags)


def schedule_for(settings, nb_iters, cluster=None):
    """The run's Schedule, or None without the flag; UserError when the phases do not fit the steps."""
    widths = check_settings(settings)
    if widths is None:
        return None
    if cluster is not None:
        raise UserError("%s is not available with several workers; expected a single-process run" % FLAG)
    if nb_iters < len(widths):
        raise UserError("%s=%s needs at least %d fine-tuning steps, one per phase; --uql_quant_epochs gives %d; "
                        "expected more epochs or fewer widths" % (FLAG, ",".join(map(str, widths)), len(widths),
                                                                  nb_iters))
    return Schedule(widths, nb_iters)


def phase_config(final_config, final_report, width):
    """The QuantConfig of a phase of `width`: every quantized weight layer and activation of the final graph (as
    `final_report` records it) at max(width, its final bits), float ones float, grids and buckets unchanged (a layer
    whose grid has one width, ternary or binary by an override, keeps it).

    Args:
      final_config: the run's QuantConfig (the last phase's).
      final_report: the QuantReport of the graph `final_config` builds.
      width: the phase's width.
    Returns:
      a QuantConfig replaying the final decisions with the widened bits.
    """
    replay = tfquant.report.config_from_report(final_report)
    # A layer an override put on a one-width grid (ternary, binary) keeps its width.
    widest = {layer.name: tfquant.config.WEIGHT_GRID_BITS[layer.weight_grid][1] for layer in final_report.layers
              if layer.kind == "weight" and layer.quantized and layer.weight_grid in tfquant.config.WEIGHT_GRID_BITS}
    most = tfquant.config.MAX_CODE_BITS
    widened = {name: bits if bits == tfquant.config.FLOAT_BITS else min(max(width, bits), widest.get(name, most))
               for name, bits in replay.explicit_bits}
    settings = {field.name: getattr(replay, field.name) for field in dataclasses.fields(replay)}
    settings.update(explicit_bits=widened, pact_decay=final_config.pact_decay)
    return tfquant.QuantConfig(**settings)


def reset_op(graph):
    """An op re-initialising the learned ranges of `graph` for a new width: init_steps counters to 0 (the next step
    computes the run's start at the graph's bits) and their optimizer slots to zero."""
    learned = graph.get_collection(ranges.LEARNED_COLLECTION)
    prefixes = tuple(v.op.name + "/" for v in learned)
    learned_names = {v.op.name for v in learned}
    counters = [v for v in graph.get_collection(ranges.RANGE_COLLECTION) if v.op.name.endswith("/init_steps")]
    slots = [v for v in graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)
             if v.op.name.startswith(prefixes) and v.op.name not in learned_names]
    with graph.as_default(), tf1.name_scope("progressive_bits_reset"):
        return tf.group(*[v.assign(tf.zeros_like(v), read_value=False) for v in counters + slots])


def phase_line(schedule, phase):
    """The progress line a run prints when a phase starts."""
    return ("uniform: progressive bits phase %d of %d at %d bits (steps %d to %d)"
            % (phase + 1, len(schedule.widths), schedule.widths[phase], schedule.starts[phase] + 1,
               schedule.end(phase)))


def results_entry(schedule):
    """The results.json entry of a progressive run."""
    return {"widths": list(schedule.widths), "phase_starts": schedule.starts, "nb_iters": schedule.nb_iters}
