"""The settings that define a run's model and training, recorded beside its checkpoints.

A rerun in the same place resumes only with the same settings: resuming 4-bit checkpoints as a 2-bit run,
or a float model trained with another learning rate, would report one model as another. The record is
`<checkpoint prefix>.settings.json`, written atomically when a run starts; keys are flag names.
"""
import json
import os

from learners import run_lock
from learners.errors import UserError
from tfquant import checkpoints, files

SETTINGS_SUFFIX = ".settings.json"
SETTINGS_VERSION = 1
# Keys of content digests (of --keras_model, --data_npz), which are not flags.
DIGEST_SUFFIX = "_sha256"
# Every uql_* flag except the checkpoint path itself (where the record lives, not what it describes), and the
# distillation flags, which shape the fine-tuning as much.
QUANT_FLAGS = ("uql_weight_bits", "uql_activation_bits", "uql_use_buckets", "uql_bucket_type", "uql_bucket_size",
               "uql_quantize_all_layers", "uql_quant_epochs", "uql_lrn_rate_init", "uql_weight_overrides",
               "uql_activation_overrides", "uql_layer_bits", "uql_act_range", "uql_ema_decay", "uql_weight_range",
               "uql_pact_decay", "uql_weight_scheme", "uql_fold_batch_norms", "uql_freeze_bn_delay",
               "uql_quantize_layer_outputs", "enbl_dst",
               "loss_w_dst", "tempr_dst", "uql_auto_bits", "uql_equivalent_bits", "uql_w_bit_min", "uql_w_bit_max",
               "uql_a_equivalent_bits", "uql_a_bit_min", "uql_a_bit_max", "uql_sensitivity_batches",
               "uql_w_measured_widths", "uql_a_measured_widths",
               "uql_enbl_rl_agent", "uql_calibrator", "uql_calib_batches", "uql_calib_percentile",
               "uql_adaround", "uql_adaround_iters", "uql_adaround_batches", "uql_bn_reestimate_batches",
               "uql_range_optimizer", "uql_range_lrn_rate", "uql_low_bit_weight_decay_scale",
               "uql_track_oscillations", "uql_freeze_oscillations", "uql_progressive_bits")


class SettingsError(UserError):
    """A settings record cannot be read, or differs from the current flags."""


def settings_path(prefix):
    """Where the record of checkpoint prefix DIR/BASENAME lives: DIR/BASENAME.settings.json."""
    return os.path.abspath(prefix) + SETTINGS_SUFFIX


def float_settings(helper, settings):
    """The settings that define a float model and its training, with the model's defaults filled in.

    Args:
      helper: the ModelHelper (its resolved learning rate, decay, model and data set names, and the digests of
        the files it read, `input_digests`, when it has them).
      settings: the parsed flags.
    Returns:
      a JSON-ready dict keyed by flag name (plus 'model' and 'dataset', set by the run script, and the digests).
    """
    record = {"model": helper.model_name, "dataset": helper.dataset_name, "batch_size": int(settings.batch_size),
              "nb_epochs_rat": float(settings.nb_epochs_rat), "momentum": float(settings.momentum),
              "seed": settings.seed, "train_subset": settings.train_subset}
    for name in ("lrn_rate_init", "loss_w_dcy"):
        value = getattr(helper, name, None)
        record[name] = float(value) if value is not None else getattr(settings, name)
    image_size = getattr(helper, "image_size", None)
    if image_size is not None:
        # Only helpers that read --image_size (ILSVRC-12) carry it: another size is another model input and
        # another learned resolution, so it must not resume these checkpoints.
        record["image_size"] = int(image_size)
    nb_workers = getattr(helper, "shard", (0, 1))[1]
    if nb_workers > 1:
        # Only multi-worker records carry them, so single-process records stay as they were; resuming with
        # another number of workers would change the global batch and the learning rate.
        record["nb_workers"] = nb_workers
        record["enbl_lrn_rate_scaling"] = bool(getattr(settings, "enbl_lrn_rate_scaling", True))
    # A model file or data set named by a flag is the model or data only through its content: another file at the
    # same path must not resume this one's checkpoints. Helpers without such files leave their records unchanged.
    record.update(getattr(helper, "input_digests", None) or {})
    return record


def quant_settings(helper, settings):
    """float_settings plus every uql_* flag that shapes the quantized model or its fine-tuning."""
    record = float_settings(helper, settings)
    for name in QUANT_FLAGS:
        value = getattr(settings, name)
        record[name] = list(value) if isinstance(value, (list, tuple)) else value
    return record


def load_record(prefix):
    """The record beside checkpoint prefix `prefix`, or None when there is none.

    Raises:
      SettingsError when it exists but is not a record this code wrote.
    """
    path = settings_path(prefix)
    if not os.path.lexists(path):
        return None
    data = files.load_json_file(path, SettingsError, "run settings file")
    if (not isinstance(data, dict) or data.get("version") != SETTINGS_VERSION
            or not isinstance(data.get("settings"), dict)):
        raise SettingsError("run settings file %s is not a settings record of version %d; expected the file a run "
                            "wrote (delete it to record the current settings)" % (path, SETTINGS_VERSION))
    return data


def _shown(value):
    return json.dumps(value) if not isinstance(value, str) else value


# Flags added after records were first written, with the value a record without them was trained with.
ADDED_LATER = {"uql_quantize_layer_outputs": False, "uql_adaround": False, "uql_adaround_iters": 500,
               "uql_adaround_batches": 4, "uql_bn_reestimate_batches": 0, "uql_range_optimizer": "shared",
               "uql_range_lrn_rate": 1e-3, "uql_low_bit_weight_decay_scale": None, "uql_track_oscillations": False,
               "uql_freeze_oscillations": None, "uql_progressive_bits": [],
               # runs before the first-order estimate measured every width
               "uql_w_measured_widths": 0, "uql_a_measured_widths": 0}


def differences(recorded, current):
    """[(key, recorded value, current value)] for every key whose values differ, in key order."""
    missing = object()
    changed = []
    for key in sorted(set(recorded) | set(current)):
        new = current.get(key, missing)
        old = recorded.get(key, ADDED_LATER.get(key, missing) if new is not missing else missing)
        if old != new:
            changed.append((key, "unset" if old is missing else old, "unset" if new is missing else new))
    return changed


def changed_settings(prefix, current, adopt=False):
    """Differences between the record of `prefix` and `current`, when `prefix` has checkpoints to resume.

    Without a checkpoint there is nothing to resume, so a stale record is simply replaced. Checkpoints without
    a record (a run killed while its directory was cleaned, files copied by hand) are refused unless `adopt`:
    their settings are unknown, so resuming them would report one model as another.
    Args:
      prefix: the checkpoint prefix.
      current: the current settings.
      adopt: take checkpoints without a record as this run's (--adopt_checkpoints).
    Returns:
      (list of differences, the record dict or None).
    """
    record = load_record(prefix)
    found = checkpoints.list_checkpoints(prefix)[0]
    if record is None and found and not adopt:
        raise SettingsError(
            "checkpoint %s has no settings record %s, so the settings it was trained with are unknown; expected a "
            "record beside every checkpoint (to resume these checkpoints with the current settings, rerun with "
            "--adopt_checkpoints; to start afresh, delete or move %s)"
            % (found[0], settings_path(prefix), os.path.dirname(os.path.abspath(prefix))))
    if record is None or not found:
        return [], record
    return differences(record["settings"], current), record


def refuse_changes(changes, places):
    """Raise SettingsError naming every changed setting with both values and how to start afresh.

    Args:
      changes: [(key, recorded, current)], possibly with repeated keys (the first is shown).
      places: the checkpoint prefixes whose records were compared, shown in the message.
    """
    if not changes:
        return
    shown, parts = set(), []
    for key, old, new in changes:
        if key in shown:
            continue
        shown.add(key)
        name = key if key in ("model", "dataset", "float_checkpoint") or key.endswith(DIGEST_SUFFIX) else "--" + key
        parts.append("%s %s (recorded) vs %s (now)" % (name, _shown(old), _shown(new)))
    directories = sorted({os.path.dirname(os.path.abspath(p)) for p in places})
    raise SettingsError(
        "settings differ from the run recorded beside %s: %s; expected the same settings to resume (to start afresh, "
        "delete or move %s or choose another --save_path / --uql_save_quant_model_path)"
        % (", ".join(settings_path(p) for p in places), ", ".join(parts), " and ".join(directories)))


def write_record(prefix, learner, current, **extra):
    """Record `current` (and extra fields such as float_checkpoint) beside `prefix`, atomically.

    Raises:
      UserError naming the path when it cannot be written (read-only directory, full disk).
    """
    path = settings_path(prefix)
    run_lock.hold(prefix)  # the first write into a run directory: no other process may write there now
    data = dict(version=SETTINGS_VERSION, learner=learner, settings=current, **extra)
    write_json(path, data, "run settings file")


def write_json(path, data, what):
    """Write a JSON file atomically (unique temporary name, flushed); OSError becomes one UserError line."""
    text = data if isinstance(data, str) else json.dumps(data, indent=2, sort_keys=True)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        files.write_atomically(path, text)
    except OSError as exc:
        raise UserError("%s %s cannot be written (%s); expected a writable directory with free space"
                        % (what, path, exc.strerror or exc)) from None
