"""`--exec_mode analyze`: which layer's suggested override would recover the most, measured without training.

For every switched target (tfquant.layer_switches) on the run's evaluation images: the network with only it
quantized, with all but it quantized, and with every layer quantized and it at the width its suggested override
gives it (8 bits: its own quantizer at that width; float for a layer at 8 bits or more). The ranking is by the last
one, because the user is told to apply that override: the cross-entropy it removes first (on a few thousand
images an accuracy moves in steps of 1/N), then the accuracy it gains. On the seed-0 ResNet-20 W2A2 run of the
layer analysis check (2,000 images), the accuracy at 8 bits put a weight whose override fine-tuning recovered
+1.80 points above an activation whose override recovered +3.45; the loss put the measured overrides in their order.
"""
import json
import os
import re
import time

from learners import run_settings, stopping
from learners.analysis import ANALYSIS_NAME, TOP_OFFENDERS, evaluation_arrays, latest_checkpoint, open_switched, \
    override_bits, write_html
from learners.errors import UserError
from tfquant import fidelity, layer_switches
from tfquant.config import FLOAT_BITS


def suggested_override(entry):
    """The flag that gives a layer the width its override was measured at (8 bits; float when it has 8 or more,
    or when its grid takes no 8 bits, as ternary and binary weights)."""
    bits = entry.get("override_bits", override_bits(entry["bits"]))
    if entry["kind"] == "weight":
        return "--uql_weight_overrides '%s=%d'" % (re.escape(entry["weight_variable"]), bits)
    return "--uql_activation_overrides '%s=%d'" % (re.escape(entry["name"]), bits)


def rank_layers(quantized, at_override):
    """Layers ranked worst first: by what their suggested override recovers.

    Args:
      quantized: (accuracy, loss) with every layer quantized.
      at_override: {layer: (accuracy, loss) with every layer quantized, this one at its override's width}.
    Returns:
      [(name, loss recovery, accuracy recovery)]: by the loss the override removes (descending), then the
      accuracy it gains (descending), then by name. The loss ranks first: on a few thousand images an accuracy
      moves in steps of 1/N and ties or swaps layers whose loss tells them apart.
    """
    rows = [(name, quantized[1] - loss, accuracy - quantized[0]) for name, (accuracy, loss) in at_override.items()]
    return sorted(rows, key=lambda row: (-row[1], -row[2], row[0]))


def _targets(switched):
    """One record per switch: layers sharing a quantizer (one weight read twice) are one target."""
    targets = []
    for record in switched.switches:
        if all(record.switch is not other.switch for other in targets):
            targets.append(record)
    return targets


def _measure_targets(switched, images, labels, chunk):
    """{layer: {mixture: (accuracy, loss)}} for each target: only it quantized ('alone'), all but it ('all_but'),
    all quantized with it at its override's width ('at_override'; the all_but one where that width is float)."""
    everything = [record.name for record in switched.switches]
    measured = {}
    for record in _targets(switched):
        # Nothing is written before the analysis ends, so it can stop between any two layers.
        stopping.check("during the layer analysis", "nothing was written")
        sharing = [r.name for r in switched.switches if r.switch is record.switch]
        others = [n for n in everything if n not in sharing]
        entry = {"alone": switched.measure(images, labels, sharing, chunk),
                 "all_but": switched.measure(images, labels, others, chunk)}
        alternative = switched.alternatives[record.switch][1]
        entry["at_override"] = (entry["all_but"] if alternative is None
                                else switched.measure(images, labels, others, chunk, at_override=record.switch))
        measured[record.name] = entry
    return measured


def analyze(helper, settings, learner):
    """--exec_mode analyze: each layer alone quantized, all but it, and at its override's width; analysis.json.

    Args:
      helper: the run's ModelHelper (evaluation images, --eval_subset applied).
      settings: parsed flags.
      learner: the uniform or ptq learner whose latest checkpoint is analysed.
    Returns:
      the lines to print.
    """
    checkpoint = latest_checkpoint(learner)
    started = time.time()
    try:
        switched, saved, report_path = open_switched(helper, checkpoint, with_overrides=True)
    except layer_switches.SwitchError as exc:
        raise UserError("%s; the layer analysis cannot switch this model's quantizers" % exc) from None
    chunk = settings.batch_size_eval
    try:
        images, labels = evaluation_arrays(helper)
        everything = [record.name for record in switched.switches]
        floating = switched.measure(images, labels, [], chunk)
        quantized = switched.measure(images, labels, everything, chunk)
        measured = _measure_targets(switched, images, labels, chunk)
        targets = {record.name: record for record in _targets(switched)}
        widths = {name: switched.alternatives[record.switch] for name, record in targets.items()}
    finally:
        switched.close()
    seconds = time.time() - started
    layers = []
    for name, loss_recovery, recovery in rank_layers(quantized, {n: m["at_override"] for n, m in measured.items()}):
        record, mixtures = targets[name], measured[name]
        bits, alternative = widths[name]
        entry = {"name": name, "kind": record.kind, "bits": record.bits, "weight_variable": record.weight_variable,
                 "accuracy_alone_quantized": mixtures["alone"][0],
                 "accuracy_all_but_this_quantized": mixtures["all_but"][0],
                 "drop_alone": fidelity.rounded(floating[0] - mixtures["alone"][0]),
                 "recovery_if_float": fidelity.rounded(mixtures["all_but"][0] - quantized[0]),
                 "loss_alone_quantized": fidelity.rounded(mixtures["alone"][1]),
                 "loss_all_but_this_quantized": fidelity.rounded(mixtures["all_but"][1]),
                 # What the suggested override itself does: the measurement the layers are ranked by.
                 "override_bits": bits if alternative is not None else FLOAT_BITS,
                 "accuracy_at_override": mixtures["at_override"][0],
                 "loss_at_override": fidelity.rounded(mixtures["at_override"][1]),
                 "recovery_at_override": fidelity.rounded(recovery),
                 "loss_recovery_at_override": fidelity.rounded(loss_recovery)}
        entry["override"] = suggested_override(entry)
        layers.append(entry)
    result = {"checkpoint": os.path.relpath(checkpoint, os.path.dirname(report_path)), "examples": len(images),
              "float_accuracy": floating[0], "quantized_accuracy": quantized[0],
              "float_loss": fidelity.rounded(floating[1]), "quantized_loss": fidelity.rounded(quantized[1]),
              "ranked_by": "loss_recovery_at_override", "seconds": fidelity.rounded(seconds), "layers": layers}
    run_dir = os.path.dirname(report_path)
    run_settings.write_json(os.path.join(run_dir, ANALYSIS_NAME), json.dumps(result, indent=2), "analysis file")
    html = write_html(run_dir)
    return _printed(learner.name, result, saved, html, run_dir)


def _printed(learner_name, result, saved, html, run_dir):
    """The lines --exec_mode analyze prints: the totals, the worst layers with their override, the files."""
    layers = result["layers"]
    lines = ["%s analyze: %d layers on %d test images in %.1f s: float %.4f, quantized %.4f (loss %.4f)"
             % (learner_name, len(layers), result["examples"], result["seconds"], result["float_accuracy"],
                result["quantized_accuracy"], result["quantized_loss"])]
    for rank, entry in enumerate(layers[:TOP_OFFENDERS], 1):
        width = "float" if entry["override_bits"] == FLOAT_BITS else "%d bits" % entry["override_bits"]
        lines.append("  %d. %s (%s, %d bits): at %s loss %.4f (%+.4f), accuracy %.4f (%+.4f); kept float %.4f, "
                     "quantized alone %.4f; fix: %s"
                     % (rank, entry["weight_variable"] or entry["name"], entry["kind"], entry["bits"], width,
                        entry["loss_at_override"], -entry["loss_recovery_at_override"], entry["accuracy_at_override"],
                        entry["recovery_at_override"], entry["accuracy_all_but_this_quantized"],
                        entry["accuracy_alone_quantized"], entry["override"]))
    if saved.allocation:
        lines.append("  (this run's bits come from --uql_auto_bits, which refuses overrides: apply them to a run "
                     "without it, or raise --uql_equivalent_bits)")
    lines.append("analysis: %s" % os.path.join(run_dir, ANALYSIS_NAME))
    lines.append("report: %s" % html)
    return lines
