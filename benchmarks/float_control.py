"""The same-budget float control of a quantized row: the same float checkpoint fine-tuned with exactly the row's
epochs, learning rate, schedule and distillation, but nothing quantized (--uql_weight_bits=32
--uql_activation_bits=32 through the same uniform learner), so a table shows what quantization costs apart from
what the extra training adds."""

# Row flags that shape the fine-tuning itself, not the quantization: the control keeps them.
TRAINING_FLAGS = ("--enbl_dst", "--loss_w_dst", "--tempr_dst", "--uql_lrn_rate_init")
NO_QUANTIZATION = ["--uql_weight_bits=32", "--uql_activation_bits=32"]


def control_flags(row_flags):
    """The control's own flags for a row's flag string: its training flags, and no quantization."""
    return [flag for flag in row_flags.split() if flag.split("=")[0] in TRAINING_FLAGS] + NO_QUANTIZATION


def control_label(row_flags, epochs):
    """The control's label: its epochs and training flags (rows sharing them share one control run)."""
    kept = [flag for flag in control_flags(row_flags) if flag not in NO_QUANTIZATION]
    return "float fine-tuned %g epochs%s" % (epochs, "".join(" " + flag for flag in kept))


def fine_tunes(row_flags):
    """Whether a row fine-tunes (post-training quantization, --learner=ptq, has no training to control for)."""
    return "--learner=ptq" not in row_flags.split()
