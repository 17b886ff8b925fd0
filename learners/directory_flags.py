"""The flags that decide which run directories a run writes: --learner, --exec_mode, --save_path and
--uql_save_quant_model_path (PocketFlow's names and defaults).

They are defined here, apart from learners/flags.py, because this module needs neither TensorFlow nor tfquant:
the early lock (learners/early_lock.py) parses exactly these definitions from the command line before TensorFlow
is imported, and learners/flags.py defines the same ones for the real parse.
"""
import os

from absl import flags

LEARNERS = ("full-prec", "uniform", "ptq")
EXEC_MODES = ("train", "eval", "export", "analyze")


def define(flag_values):
    """Define the four directory flags on `flag_values` (absl's FLAGS, or a private FlagValues)."""
    flags.DEFINE_enum("learner", "full-prec", list(LEARNERS),
                      "learner: full-prec, uniform or ptq (post-training calibration)", flag_values=flag_values)
    flags.DEFINE_enum("exec_mode", "train", list(EXEC_MODES),
                      "train, eval the latest checkpoint, export it (--learner uniform or ptq, --export_dir), or "
                      "analyze it layer by layer (--learner uniform or ptq: analysis.json)", flag_values=flag_values)
    flags.DEFINE_string("save_path", "./models/model.ckpt", "float model checkpoint path prefix",
                        flag_values=flag_values)
    flags.DEFINE_string("uql_save_quant_model_path", "./models_uql/model.ckpt",
                        "quantized model checkpoint path prefix", flag_values=flag_values)


def locked_prefixes(learner, exec_mode, save_path, quant_save_path):
    """The checkpoint prefixes whose directories a run holds locked, by mode, each with how.

    Returns:
      [(prefix, shared)]: training holds the float prefix's directory exclusively with --learner full-prec; with
      uniform/ptq it holds the quantized one exclusively and the float one shared, since it only reads a finished
      float checkpoint (several fine-tunings may start from one float model at once) and upgrades that lock to an
      exclusive one only when it has to train or finish the float model (run_settings.write_record); an export
      holds the quantized run's directory exclusively (it reads it and writes beside it).
    """
    if exec_mode == "train":
        return [(save_path, False)] if learner == "full-prec" else [(save_path, True), (quant_save_path, False)]
    if exec_mode == "export" and learner != "full-prec":
        return [(quant_save_path, False)]
    return []


def directory_modes(prefixes, include=None):
    """[(directory, shared)] of locked_prefixes' pairs, one per directory in order (exclusive where any pair
    sharing it is), keeping only the directories `include(directory)` accepts."""
    modes = {}
    for prefix, shared in prefixes:
        directory = os.path.dirname(os.path.abspath(prefix))
        if include is None or include(directory):
            modes[directory] = modes.get(directory, True) and shared
    return list(modes.items())
