"""absl flags for the run scripts. PocketFlow's names keep their meaning; tfquant adds a few."""
import math
import os

from absl import flags

import tfquant
from learners import directory_flags, flag_tables
from learners.errors import UserError

FLAGS = flags.FLAGS
LEARNERS = directory_flags.LEARNERS


def define_flags():
    """Define every flag once (run scripts and tests may call this repeatedly)."""
    if "learner" in FLAGS:
        return
    # --learner, --exec_mode, --save_path, --uql_save_quant_model_path: the early lock parses these too.
    directory_flags.define(FLAGS)
    # absl.logging defines --log_dir when imported; TensorFlow imports it, and so may anything after this, so it is
    # imported first here whatever else was (a second definition would fail).
    from absl import logging  # noqa: F401
    if "log_dir" in FLAGS:
        # absl.logging defines --log_dir too; PocketFlow's meaning (TensorBoard events) takes it over.
        FLAGS.set_default("log_dir", "./logs")
    else:
        flags.DEFINE_string("log_dir", "./logs", "TensorBoard event files go under this directory")
    for table in flag_tables.TABLES:
        for define, *arguments in table:
            define(*arguments)


# PocketFlow's defaults of a run script where they differ from the shared ones (its ILSVRC-12 data set sets batch
# sizes 64 and 100; its ILSVRC-12 ResNet is ResNet-18); MobileNet's depthwise layers get one range per channel
# (and keep its quantized tensors: rebuilding them costs MobileNetV2 a fifth of its step).
SCRIPT_DEFAULTS = {
    # At ImageNet sizes memory bounds the batch: rebuilding the quantized tensors in the backward pass keeps a
    # ResNet's peak near float's for a few percent of step time (ResNet-50 W4A4 at 224x224: BENCHMARKS.md, Scale).
    "resnet_at_ilsvrc12": {"batch_size": 64, "batch_size_eval": 100, "resnet_size": 18,
                           "uql_recompute_quantized": "all"},
    "mobilenet_at_ilsvrc12": {"batch_size": 64, "batch_size_eval": 100, "uql_use_buckets": True},
    "mobilenet_at_fmnist": {"mobilenet_version": 2, "uql_use_buckets": True},
    # A user's model file: per-channel weight ranges (what TFLite and ONNX runtimes use for convolutions); one
    # range per depthwise tensor at W4 lost 9.5 points on a separable-conv model that channel ranges kept.
    "model_file": {"uql_use_buckets": True},
}
# Scripts whose quantized runs train, where the command line leaves them unset, with the settings under which the
# int8 export computes the trained graph (learners.deployment_settings): a user's model file is there to be deployed.
DEPLOYMENT_SCRIPTS = ("model_file",)


def use_script_defaults(script):
    """Define the flags and set the defaults of run script `script` (nets/<script>_run.py), before parsing."""
    define_flags()
    for name, value in SCRIPT_DEFAULTS.get(script, {}).items():
        FLAGS.set_default(name, value)


def _positive(name, minimum=1):
    value = getattr(FLAGS, name)
    if value is not None and value < minimum:
        raise UserError("--%s=%s is not valid; expected a value >= %s" % (name, value, minimum))


def _writable_parent(name, path, directory=None):
    """Refuse --name=path unless `directory` (default: the path's directory) is or can be made writable."""
    directory = directory or os.path.dirname(os.path.abspath(path)) or "."
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise UserError("--%s=%s is not valid; expected a path in a writable directory (%s is not)"
                        % (name, path, probe))


def float_flag_names():
    """Names of every float-valued flag defined (ours and any other module's), sorted."""
    return sorted(name for name in FLAGS if isinstance(FLAGS[name].parser, flags.FloatParser))


def _finite_floats():
    # absl parses "nan" and "inf" as floats and its bounds checks let NaN through.
    for name in float_flag_names():
        value = getattr(FLAGS, name)
        if value is not None and not math.isfinite(value):
            raise UserError("--%s=%s is not valid; expected a finite number" % (name, value))


def validate_flags():
    """Check value ranges and paths; raises UserError with one line naming the flag."""
    _finite_floats()
    for name in ("batch_size", "batch_size_eval", "summ_step", "save_step", "nb_workers"):
        _positive(name)
    for name in ("train_subset", "eval_subset", "uql_calib_batches", "uql_analysis_batches", "image_size"):
        _positive(name)
    if not 0 < FLAGS.uql_calib_percentile <= 100:
        raise UserError("--uql_calib_percentile=%s is not valid; expected a number in (0, 100]"
                        % FLAGS.uql_calib_percentile)
    for name in ("lrn_rate_init", "uql_lrn_rate_init", "nb_epochs_rat", "uql_quant_epochs", "save_secs",
                 "collective_timeout_secs", "batch_size_norm", "mobilenet_depth_mult"):
        if getattr(FLAGS, name) is not None and not getattr(FLAGS, name) > 0:
            raise UserError("--%s=%s is not valid; expected a positive number" % (name, getattr(FLAGS, name)))
    for name in ("momentum", "loss_w_dcy"):
        if getattr(FLAGS, name) is not None and getattr(FLAGS, name) < 0:
            raise UserError("--%s=%s is not valid; expected a number >= 0" % (name, getattr(FLAGS, name)))
    for name, low, expected in (("loss_w_dst", 0.0, "a finite number >= 0"),
                                ("tempr_dst", None, "a finite number > 0")):
        value = getattr(FLAGS, name)
        if not math.isfinite(value) or (value < low if low is not None else value <= 0):
            raise UserError("--%s=%s is not valid; expected %s" % (name, value, expected))
    if FLAGS.enbl_dst and FLAGS.learner != "uniform":
        raise UserError("--enbl_dst is not valid with --learner=%s; expected --learner=uniform (the teacher is "
                        "the float checkpoint)" % FLAGS.learner)
    if FLAGS.exec_mode == "export" and FLAGS.learner not in ("uniform", "ptq"):
        raise UserError("--exec_mode=export is not valid with --learner=%s; expected --learner=uniform or ptq "
                        "(export packs a quantized checkpoint)" % FLAGS.learner)
    if FLAGS.exec_mode == "analyze" and FLAGS.learner not in ("uniform", "ptq"):
        raise UserError("--exec_mode=analyze is not valid with --learner=%s; expected --learner=uniform or ptq "
                        "(it switches a quantized checkpoint's quantizers layer by layer)" % FLAGS.learner)
    if FLAGS.export_int8_calibration and not FLAGS.export_int8:
        raise UserError("--export_int8_calibration is not valid without --export_int8; expected both")
    if FLAGS.exec_mode == "export" and not FLAGS.export_dir:
        raise UserError("--export_dir is not set; expected the directory --exec_mode=export writes the exported "
                        "files to")
    if FLAGS.data_dir_local is not None and not os.path.isdir(FLAGS.data_dir_local):
        raise UserError("--data_dir_local=%s is not valid; expected an existing directory" % FLAGS.data_dir_local)
    for name in ("save_path", "uql_save_quant_model_path"):
        _writable_parent(name, getattr(FLAGS, name))
    _writable_parent("log_dir", FLAGS.log_dir, os.path.abspath(FLAGS.log_dir))
    _check_auto_bits()
    _check_adaround_and_bn_reestimation()
    _check_recipes()
    from learners import progressive_bits  # pylint: disable=import-outside-toplevel  (imports TensorFlow)
    progressive_bits.check_flags(FLAGS)
    quant_config()  # bit widths, overrides and bucket settings are checked by tfquant itself
    _check_no_flag_ignored()


# Flags that only take effect with a setting of another flag: (flags, whether that setting holds, the setting).
# Given on a command line without it they would be ignored in silence, so they are refused instead. Flags of
# another learner are not refused: one set of flags may serve a float run and the quantized runs after it.
_DEPENDENT_FLAGS = (
    (("export_dir", "export_int8", "export_onnx"), lambda: FLAGS.exec_mode == "export", "--exec_mode=export"),
    (("loss_w_dst", "tempr_dst"), lambda: FLAGS.enbl_dst, "--enbl_dst"),
    (("adopt_checkpoints",), lambda: FLAGS.exec_mode == "train", "--exec_mode=train"),
    (("uql_bucket_type",), lambda: FLAGS.uql_use_buckets, "--uql_use_buckets"),
    (("uql_bucket_size",), lambda: FLAGS.uql_use_buckets and FLAGS.uql_bucket_type in ("split", "block"),
     "--uql_use_buckets --uql_bucket_type=split or block"),
    (("uql_ema_decay",), lambda: FLAGS.uql_act_range == "ema", "--uql_act_range=ema"),
    (("uql_pact_decay",), lambda: FLAGS.uql_act_range == "pact", "--uql_act_range=pact"),
    (("uql_freeze_bn_delay",), lambda: FLAGS.uql_fold_batch_norms, "--uql_fold_batch_norms"),
    (("uql_calib_percentile",), lambda: FLAGS.uql_calibrator == "percentile", "--uql_calibrator=percentile"),
    (("uql_adaround_iters", "uql_adaround_batches"), lambda: FLAGS.uql_adaround, "--uql_adaround"),
    (("uql_range_lrn_rate",), lambda: FLAGS.uql_range_optimizer != "shared",
     "--uql_range_optimizer=adam, momentum or sgd"),
)


def _check_recipes():
    """The low-bit recipes' values; PACT's decay is refused with a range optimizer, which trains without decay."""
    if not FLAGS.uql_range_lrn_rate > 0:
        raise UserError("--uql_range_lrn_rate=%s is not valid; expected a positive number" % FLAGS.uql_range_lrn_rate)
    if FLAGS.uql_range_optimizer != "shared" and FLAGS["uql_pact_decay"].present:
        raise UserError("--uql_pact_decay=%s is given with --uql_range_optimizer=%s, which trains the clip levels "
                        "without decay; expected one of them" % (FLAGS.uql_pact_decay, FLAGS.uql_range_optimizer))
    scale = FLAGS.uql_low_bit_weight_decay_scale
    if scale is not None and scale < 0:
        raise UserError("--uql_low_bit_weight_decay_scale=%s is not valid; expected a number >= 0" % scale)
    threshold = FLAGS.uql_freeze_oscillations
    if threshold is not None and not 0 < threshold < 1:
        raise UserError("--uql_freeze_oscillations=%s is not valid; expected a frequency in (0, 1) (reversals per "
                        "step, e.g. 0.02)" % threshold)


def _check_adaround_and_bn_reestimation():
    """AdaRound only for --learner ptq on a min/max or symmetric grid; BN re-estimation only for --learner uniform."""
    for name in ("uql_adaround_iters", "uql_adaround_batches"):
        _positive(name)
    if FLAGS.uql_bn_reestimate_batches < 0:
        raise UserError("--uql_bn_reestimate_batches=%d is not valid; expected 0 (off) or a number of batches"
                        % FLAGS.uql_bn_reestimate_batches)
    if FLAGS.uql_bn_reestimate_batches and FLAGS.learner != "uniform":
        raise UserError("--uql_bn_reestimate_batches is not valid with --learner=%s; expected --learner=uniform "
                        "(it re-estimates the statistics after quantized training)" % FLAGS.learner)
    if not FLAGS.uql_adaround:
        return
    if FLAGS.learner != "ptq":
        raise UserError("--uql_adaround is not valid with --learner=%s; expected --learner=ptq" % FLAGS.learner)
    from learners import adaround_runner  # pylint: disable=import-outside-toplevel  (imports TensorFlow)
    adaround_runner.check_config(quant_config())


def _check_no_flag_ignored():
    """Refuse a flag given without the setting it takes effect under (see _DEPENDENT_FLAGS)."""
    for names, holds, setting in _DEPENDENT_FLAGS:
        for name in names:
            if FLAGS[name].present and not holds():
                raise UserError("--%s=%s has no effect without %s; expected %s with it, or the flag left out"
                                % (name, getattr(FLAGS, name), setting, setting))


def _check_bit_range(kind, low_name, high_name, budget_name):
    low, high, budget = getattr(FLAGS, low_name), getattr(FLAGS, high_name), getattr(FLAGS, budget_name)
    for name, value in ((low_name, low), (high_name, high)):
        if not 1 <= value <= 16:
            raise UserError("--%s=%s is not valid; expected an integer from 1 to 16" % (name, value))
    if low > high:
        raise UserError("--%s=%s is above --%s=%s; expected min <= max" % (low_name, low, high_name, high))
    if budget < low:
        raise UserError("--%s=%s is below --%s=%s: no %s allocation fits; expected a budget of at least %s"
                        % (budget_name, budget, low_name, low, kind, low))
    if budget > high:
        raise UserError("--%s=%s is above --%s=%s: every layer would simply take the widest width; expected a "
                        "budget of at most %s" % (budget_name, budget, high_name, high, high))


# Flags that only the automatic allocation reads (PocketFlow's budget and range flags served its RL agent alone).
_AUTO_BITS_ONLY = ("uql_equivalent_bits", "uql_w_bit_min", "uql_w_bit_max", "uql_sensitivity_batches",
                   "uql_w_measured_widths")
_ACTIVATION_BUDGET_ONLY = ("uql_a_bit_min", "uql_a_bit_max", "uql_a_measured_widths")


def _check_auto_bits():
    """The bit-allocation flags: PocketFlow's RL agent is refused, budgets must fit their bit ranges."""
    if FLAGS.uql_enbl_rl_agent:
        raise UserError("--uql_enbl_rl_agent is not available: tfquant has no RL agent; expected --uql_auto_bits "
                        "(exact allocation under --uql_equivalent_bits)")
    if not FLAGS.uql_auto_bits:
        # These only shape the automatic allocation: given without it they would be ignored in silence.
        for name in ("uql_a_equivalent_bits",) + _AUTO_BITS_ONLY + _ACTIVATION_BUDGET_ONLY:
            if FLAGS[name].present:
                raise UserError("--%s=%s is given without --uql_auto_bits; expected --uql_auto_bits with it (it "
                                "only sets the automatic bit allocation)" % (name, getattr(FLAGS, name)))
        return
    if FLAGS.uql_a_equivalent_bits is None:
        for name in _ACTIVATION_BUDGET_ONLY:
            if FLAGS[name].present:
                raise UserError("--%s=%s is given without --uql_a_equivalent_bits; expected an activation budget "
                                "with it (activation bits are allocated only under one)"
                                % (name, getattr(FLAGS, name)))
    if FLAGS.learner != "uniform":
        raise UserError("--uql_auto_bits is not valid with --learner=%s; expected --learner=uniform" % FLAGS.learner)
    for name in ("uql_layer_bits", "uql_weight_overrides"):
        if getattr(FLAGS, name):
            raise UserError("--%s=%s is given with --uql_auto_bits; expected one of them (the allocation decides "
                            "every weight layer's bits)" % (name, ",".join(getattr(FLAGS, name))))
    _positive("uql_sensitivity_batches")
    for name in ("uql_w_measured_widths", "uql_a_measured_widths"):
        if getattr(FLAGS, name) < 0:
            raise UserError("--%s=%d is not valid; expected 0 (every width measured) or a positive count of the "
                            "narrowest widths to measure" % (name, getattr(FLAGS, name)))
    _check_bit_range("weight", "uql_w_bit_min", "uql_w_bit_max", "uql_equivalent_bits")
    grid, (field, value) = tfquant.config.weight_grid_of(FLAGS.uql_weight_range, FLAGS.uql_weight_scheme)
    fewest, most = tfquant.config.WEIGHT_GRID_BITS[grid]
    setting = "--uql_%s=%s" % (field, value)
    if FLAGS.uql_w_bit_min < fewest:
        raise UserError("--uql_w_bit_min=%d is not valid with %s; expected at least %d"
                        % (FLAGS.uql_w_bit_min, setting, fewest))
    if FLAGS.uql_w_bit_max > most:
        raise UserError("--uql_w_bit_max=%d is not valid with %s; expected at most %d"
                        % (FLAGS.uql_w_bit_max, setting, most))
    if FLAGS.uql_a_equivalent_bits is not None:
        if FLAGS.uql_activation_overrides:
            raise UserError("--uql_activation_overrides=%s is given with --uql_a_equivalent_bits; expected one of "
                            "them" % ",".join(FLAGS.uql_activation_overrides))
        _check_bit_range("activation", "uql_a_bit_min", "uql_a_bit_max", "uql_a_equivalent_bits")


def quant_config():
    """The QuantConfig the uql_* flags describe; tfquant's ValueError becomes a UserError."""
    try:
        layer_bits = None
        if FLAGS.uql_layer_bits:
            try:
                layer_bits = [int(b) for b in FLAGS.uql_layer_bits]
            except ValueError:
                raise ValueError("--uql_layer_bits=%s is not valid; expected a comma-separated list of integers"
                                 % ",".join(FLAGS.uql_layer_bits))
        return tfquant.QuantConfig(
            weight_bits=FLAGS.uql_weight_bits, activation_bits=FLAGS.uql_activation_bits,
            use_buckets=FLAGS.uql_use_buckets, bucket_type=FLAGS.uql_bucket_type,
            bucket_size=FLAGS.uql_bucket_size, quantize_all_layers=FLAGS.uql_quantize_all_layers,
            layer_bits=layer_bits,
            weight_overrides=tfquant.parse_overrides("--uql_weight_overrides", FLAGS.uql_weight_overrides),
            activation_overrides=tfquant.parse_overrides("--uql_activation_overrides",
                                                         FLAGS.uql_activation_overrides),
            act_range=FLAGS.uql_act_range, act_ema_decay=FLAGS.uql_ema_decay,
            pact_decay=FLAGS.uql_pact_decay, weight_range=FLAGS.uql_weight_range,
            weight_scheme=FLAGS.uql_weight_scheme, fold_batch_norms=FLAGS.uql_fold_batch_norms,
            freeze_bn_delay=FLAGS.uql_freeze_bn_delay, quantize_layer_outputs=FLAGS.uql_quantize_layer_outputs,
            recompute_quantized=FLAGS.uql_recompute_quantized)
    except ValueError as exc:
        message = str(exc)
        for field, flag in _CONFIG_FLAG_NAMES:
            if message.startswith(field):
                message = "--" + flag + message[len(field):]
                break
        raise UserError(message)


# QuantConfig field -> the flag that sets it, so messages name what the user typed.
_CONFIG_FLAG_NAMES = (
    ("weight_bits", "uql_weight_bits"), ("activation_bits", "uql_activation_bits"),
    ("bucket_size", "uql_bucket_size"), ("layer_bits", "uql_layer_bits"),
    ("weight_overrides", "uql_weight_overrides"), ("activation_overrides", "uql_activation_overrides"),
    ("act_ema_decay", "uql_ema_decay"), ("pact_decay", "uql_pact_decay"), ("weight_range", "uql_weight_range"),
    ("act_range", "uql_act_range"), ("weight_scheme", "uql_weight_scheme"),
    ("fold_batch_norms", "uql_fold_batch_norms"), ("freeze_bn_delay", "uql_freeze_bn_delay"),
    ("quantize_layer_outputs", "uql_quantize_layer_outputs"))
