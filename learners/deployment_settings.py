"""The settings under which a quantized run's int8 TFLite / ONNX files compute its trained graph, as defaults.

A user's model file is quantized to be deployed. Trained on the min/max weight grid with the input, the layer
outputs and the logits left float (the shared defaults, PocketFlow's), an int8 export re-grids every weight to
8-bit symmetric and calibrates those tensors, so its files disagree with the quantized model the run reported
(measured: up to 1.5 points of accuracy). nets/model_file_run.py therefore trains, where the command line leaves
them unset and the run's other settings allow them, with

  --uql_weight_scheme=symmetric     weights on the grid int8 kernels store (zero point 0);
  --uql_quantize_layer_outputs      the input, layer outputs and logits on the int8 runtimes' grid.

A flag given on the command line is never changed; a setting the others exclude (a learned or ternary weight
grid, PACT or LSQ activation ranges, 1-bit weights, ...) stays off, and a resumed run keeps what its record says.
Each decision is one note, printed and kept in the quantization report.
"""
import os

from learners import run_settings
from learners.errors import UserError
from tfquant import checkpoints

# (flag, the deployment value, what it does for the int8 files).
DEPLOYMENT = (
    ("uql_weight_scheme", "symmetric", "weights on the grid int8 kernels store"),
    ("uql_quantize_layer_outputs", True, "the input, layer outputs and logits on the int8 runtimes' grid"),
)
# What an int8 / ONNX export does where a deployment setting is off.
WITHOUT = {
    "uql_weight_scheme": "an int8 / ONNX export re-grids the weights to 8-bit symmetric",
    "uql_quantize_layer_outputs": "an int8 / ONNX export calibrates the ranges of the input, layer outputs and "
                                  "logits",
}


def _flag_text(name, value):
    if value is True:
        return "--" + name
    if value is False:
        return "--no" + name
    return "--%s=%s" % (name, value)


def _excluded(settings, name):
    """Why the other settings exclude deployment setting `name` (None: they allow it) without validating."""
    if name == "uql_quantize_layer_outputs" and settings.uql_act_range != "ema":
        # quantize_layer_outputs takes LSQ ranges too, but as learned steps the runtimes do not hold: the export
        # calibrates them either way, so the default adds nothing the int8 files keep.
        return ("--uql_act_range=%s learns its ranges, which the int8 runtimes do not hold as trained"
                % settings.uql_act_range)
    return None


def _recorded(settings):
    """The settings record of the quantized run this one resumes (uniform training with checkpoints), or None."""
    if settings.learner != "uniform":
        return None  # ptq calibrates afresh: nothing to resume
    prefix = settings.uql_save_quant_model_path
    try:
        record = run_settings.load_record(prefix)
    except UserError:
        return None  # a broken record: the learner refuses it in its own words
    if record is None or not checkpoints.list_checkpoints(prefix)[0]:
        return None
    return record


def apply(settings, validate):
    """Set each deployment setting the command line left unset, where the run's other settings allow it.

    Args:
      settings: the parsed flags (absl FlagValues: `settings[name].present` says whether a flag was given).
      validate: checks the flags, raising UserError (learners.flags.validate_flags).
    Returns:
      the notes (one line each) saying which settings the run applied and why.
    Raises:
      UserError: the flags are invalid whatever the deployment settings (the user's own error, unchanged).
    """
    if settings.exec_mode != "train" or settings.learner not in ("uniform", "ptq"):
        return []  # evaluation and export rebuild the checkpoint's own config from its report
    record = _recorded(settings)
    applied, kept = [], []
    for name, value, purpose in DEPLOYMENT:
        if settings[name].present:
            continue
        if record is not None:
            recorded = record["settings"].get(name, run_settings.ADDED_LATER.get(name))
            if recorded is not None and recorded != value:
                setattr(settings, name, recorded)
                kept.append("%s as recorded by the run it resumes in %s (%s)" % (
                    _flag_text(name, recorded), os.path.dirname(os.path.abspath(settings.uql_save_quant_model_path)),
                    WITHOUT[name]))
                continue
        reason = _excluded(settings, name)
        if reason is None:
            default = getattr(settings, name)
            setattr(settings, name, value)
            try:
                validate()
            except UserError as conflict:
                setattr(settings, name, default)
                validate()  # raises the user's own error when the flags are invalid without the setting too
                reason = str(conflict)
        if reason is None:
            applied.append("%s (%s)" % (_flag_text(name, value), purpose))
        else:
            kept.append("%s, not %s: %s (%s)" % (_flag_text(name, getattr(settings, name)), _flag_text(name, value),
                                                  reason, WITHOUT[name]))
    notes = []
    if applied:
        notes.append("deployment settings of nets/model_file_run.py applied: %s, so the int8 TFLite / ONNX export "
                     "computes the trained graph; give the flag to choose otherwise" % "; ".join(applied))
    notes.extend("deployment setting not applied: %s" % text for text in kept)
    return notes
