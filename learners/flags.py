"""absl flags for the run scripts. PocketFlow's names keep their meaning; tfquant adds a few."""
import math
import os

from absl import flags

import tfquant
from learners.errors import UserError

FLAGS = flags.FLAGS
LEARNERS = ("full-prec", "uniform", "ptq")


def define_flags():
    """Define every flag once (run scripts and tests may call this repeatedly)."""
    if "learner" in FLAGS:
        return
    flags.DEFINE_enum("learner", "full-prec", list(LEARNERS),
                      "learner: full-prec, uniform or ptq (post-training calibration)")
    flags.DEFINE_enum("exec_mode", "train", ["train", "eval", "export", "analyze"],
                      "train, eval the latest checkpoint, export it (--learner uniform or ptq, --export_dir), or "
                      "analyze it layer by layer (--learner uniform or ptq: analysis.json)")
    flags.DEFINE_string("export_dir", None, "--exec_mode export: directory the exported files go to")
    flags.DEFINE_boolean("export_int8", False, "--exec_mode export: also write float and int8 TFLite models (int8 "
                         "with the trained weight and activation ranges)")
    flags.DEFINE_boolean("export_int8_calibration", False, "--exec_mode export with --export_int8: let the "
                         "converter calibrate every activation range on training images instead")
    flags.DEFINE_boolean("export_onnx", False, "--exec_mode export: also write model.onnx with QuantizeLinear/"
                         "DequantizeLinear pairs carrying the trained ranges (needs tf2onnx and onnxruntime)")
    if "log_dir" in FLAGS:
        # absl.logging defines --log_dir too; PocketFlow's meaning (TensorBoard events) takes it over.
        FLAGS.set_default("log_dir", "./logs")
    else:
        flags.DEFINE_string("log_dir", "./logs", "TensorBoard event files go under this directory")
    flags.DEFINE_string("save_path", "./models/model.ckpt", "float model checkpoint path prefix")
    flags.DEFINE_integer("batch_size", 128, "training batch size")
    flags.DEFINE_integer("batch_size_eval", 500, "evaluation batch size")
    flags.DEFINE_float("lrn_rate_init", None, "initial learning rate of float training (default: the model's)")
    flags.DEFINE_float("momentum", 0.9, "momentum of the optimizer")
    flags.DEFINE_float("loss_w_dcy", None, "weight decay factor (default: the model's)")
    flags.DEFINE_float("nb_epochs_rat", 1.0, "fraction of the model's standard number of epochs")
    flags.DEFINE_integer("summ_step", 100, "log progress and write summaries every this many iterations")
    flags.DEFINE_integer("save_step", None, "save a checkpoint every this many iterations (default: every epoch)")
    flags.DEFINE_float("save_secs", 600.0, "also save a checkpoint when this many seconds passed since the last")
    flags.DEFINE_integer("resnet_size", 20, "ResNet depth: 20, 32, 44, 56 or 110 (CIFAR-style scripts); 18, 34, 50 "
                         "or 101 (nets/resnet_at_ilsvrc12_run.py, default 18)")
    # The ILSVRC-12 and Transformer scripts (PocketFlow's names where it had them).
    flags.DEFINE_integer("mobilenet_version", 1, "MobileNet's version (1 or 2)")
    flags.DEFINE_float("mobilenet_depth_mult", 1.0, "MobileNet's depth multiplier")
    flags.DEFINE_float("batch_size_norm", None, "the learning rate is lrn_rate_init * batch_size / batch_size_norm "
                       "(ILSVRC-12 scripts; default: the model's, ResNet 256, MobileNet 96)")
    flags.DEFINE_integer("image_size", 224, "side of the square images an ILSVRC-12 model reads (crops are "
                         "resized to it)")
    flags.DEFINE_enum("transformer_tokens", "patches", ["patches", "rows"], "the Transformer's tokens: 4x4 "
                      "patches (49 tokens) or image rows (28 tokens)")
    flags.DEFINE_string("data_dir_local", None, "data directory (default: the dataset's standard location)")
    flags.DEFINE_integer("uql_weight_bits", 4, "weight bits (1..16, 32 = float)")
    flags.DEFINE_integer("uql_activation_bits", 32, "activation bits (1..16, 32 = float)")
    flags.DEFINE_boolean("uql_use_buckets", False, "one range per bucket instead of per layer")
    flags.DEFINE_enum("uql_bucket_type", "channel", ["channel", "split", "block"],
                      "bucket type: channel (one range per output channel), split (pieces of the flattened "
                      "weight) or block (per output channel, blocks of --uql_bucket_size input elements: the "
                      "layout of onnxruntime's MatMulNBits)")
    flags.DEFINE_integer("uql_bucket_size", 256, "elements per bucket for split and block buckets (block: a power "
                         "of 2 >= 16)")
    flags.DEFINE_boolean("uql_quantize_all_layers", False, "also quantize the first and last layers")
    flags.DEFINE_float("uql_quant_epochs", 1.0, "epochs of quantized fine-tuning")
    flags.DEFINE_string("uql_save_quant_model_path", "./models_uql/model.ckpt",
                        "quantized model checkpoint path prefix")
    # tfquant's additions.
    flags.DEFINE_float("uql_lrn_rate_init", 0.01, "initial learning rate of quantized fine-tuning (cosine decay)")
    flags.DEFINE_list("uql_weight_overrides", [], "ordered regex=bits or regex=SPEC overrides for weight variable "
                      "names, SPEC ':'-separated bits (1..16, float), grid (minmax, symmetric, lsq, ternary, binary) "
                      "and buckets (none, channel, split[/N], block[/N]), e.g. conv1/.*=4:channel:symmetric; "
                      "first full match wins")
    flags.DEFINE_list("uql_activation_overrides", [], "ordered regex=bits overrides for activation op names")
    flags.DEFINE_list("uql_layer_bits", [], "explicit weight bits per matmul-like layer in data-flow order")
    flags.DEFINE_enum("uql_act_range", "ema", list(tfquant.config.ACT_RANGES),
                      "activation ranges: batch min/max with moving averages at evaluation (ema), the current "
                      "batch everywhere (batch, PocketFlow's behaviour), a learned clip level (pact) or a "
                      "learned step size (lsq; LSQ+ offset for activations that can be negative)")
    flags.DEFINE_enum("uql_weight_range", "minmax", list(tfquant.config.WEIGHT_RANGES),
                      "weight ranges: max - min per range group (minmax, PocketFlow's), a learned step size "
                      "per range group on a signed grid (lsq), codes -1/0/+1 times a per-group scale (ternary, "
                      "TWN; 2 bits) or the sign times the group's mean |w| (binary; 1 bit)")
    flags.DEFINE_float("uql_pact_decay", 2e-4, "L2 decay weight on PACT's clip levels (--uql_act_range pact)")
    flags.DEFINE_enum("uql_weight_scheme", "asymmetric", list(tfquant.config.WEIGHT_SCHEMES),
                      "weight grid: min/max (asymmetric, PocketFlow's) or zero point 0 on +-(2^(k-1)-1) "
                      "(symmetric, what int8 kernels store)")
    flags.DEFINE_boolean("uql_fold_batch_norms", False, "quantize conv/matmul weights folded with the batch norm "
                         "that follows them (W * gamma / sigma), as they are deployed")
    flags.DEFINE_integer("uql_freeze_bn_delay", None, "with --uql_fold_batch_norms: training step from which the "
                         "moving statistics replace the batch statistics (default: never)")
    flags.DEFINE_boolean("uql_quantize_layer_outputs", False, "also quantize (with --uql_activation_bits and "
                         "moving-average ranges) the model input, layer outputs no quantized activation covers "
                         "(before residual adds, the logits) and residual sums, on the int8 runtimes' grid: the "
                         "trained graph is then the int8 TFLite/ONNX model, and --export_int8 needs no "
                         "calibration")
    # PocketFlow's distillation flags, with its defaults.
    flags.DEFINE_boolean("enbl_dst", False, "add a distillation loss from the float model (--learner uniform)")
    flags.DEFINE_float("loss_w_dst", 4.0, "weight of the distillation loss")
    flags.DEFINE_float("tempr_dst", 4.0, "temperature of the distillation softmax")
    flags.DEFINE_float("uql_ema_decay", 0.99, "decay of the activation-range moving averages")
    # Automatic bit allocation (issue 12); PocketFlow's budget names keep their meaning.
    flags.DEFINE_boolean("uql_auto_bits", False, "choose weight (and with --uql_a_equivalent_bits, activation) bits "
                         "per layer: least measured sensitivity within the budget, solved exactly")
    flags.DEFINE_float("uql_equivalent_bits", 4.0, "weight budget: sum(bits * |W|) <= this * sum(|W|) over the "
                       "quantized layers (--uql_auto_bits)")
    flags.DEFINE_integer("uql_w_bit_min", 2, "narrowest weight width --uql_auto_bits may choose")
    flags.DEFINE_integer("uql_w_bit_max", 8, "widest weight width --uql_auto_bits may choose")
    flags.DEFINE_float("uql_a_equivalent_bits", None, "activation budget: mean activation bits weighted by "
                       "activation size (--uql_auto_bits; off unless given)")
    flags.DEFINE_integer("uql_a_bit_min", 2, "narrowest activation width --uql_auto_bits may choose")
    flags.DEFINE_integer("uql_a_bit_max", 8, "widest activation width --uql_auto_bits may choose")
    flags.DEFINE_integer("uql_sensitivity_batches", 1, "training batches the sensitivities are measured on "
                         "(--uql_auto_bits)")
    flags.DEFINE_boolean("uql_enbl_rl_agent", False, "PocketFlow's RL agent; not available (use --uql_auto_bits)")
    flags.DEFINE_integer("train_subset", None, "use only the first N training images (quick runs, tests)")
    flags.DEFINE_integer("eval_subset", None, "use only the first N test images (quick runs, tests)")
    flags.DEFINE_boolean("adopt_checkpoints", False, "resume from checkpoints that have no settings record beside "
                         "them (their settings are unknown), recording the current settings as theirs")
    flags.DEFINE_integer("seed", 0, "random seed of initialisation and data order")
    flags.DEFINE_boolean("debug", False, "show tracebacks for user errors (and check that the workers are in "
                         "sync every summ_step)")
    # Multi-worker training (learners/distributed.py).
    flags.DEFINE_integer("nb_workers", 1, "worker processes to start on this machine (./run_local.sh starts them); "
                         "on a cluster set TF_CONFIG on every machine instead")
    flags.DEFINE_boolean("enbl_lrn_rate_scaling", True, "with several workers, multiply the learning rate by the "
                         "number of workers (PocketFlow's multi-GPU scaling for its larger global batch)")
    flags.DEFINE_float("collective_timeout_secs", 40.0, "with several workers, stop when a step waits this long for "
                       "the others (a dead or stopped worker)")
    # Your own model and data (nets/keras_model_run.py) and post-training calibration (--learner ptq).
    flags.DEFINE_string("keras_model", None, "a tf_keras model: .h5 or .keras file, or a SavedModel directory")
    flags.DEFINE_boolean("keras_unsafe", False, "load Lambda layers of --keras_model (runs code from the file)")
    flags.DEFINE_string("data_npz", None, "an .npz archive with x_train, y_train, x_test, y_test")
    flags.DEFINE_enum("dataset", None, ["fmnist", "cifar10"], "a built-in data set for --keras_model")
    flags.DEFINE_string("uql_save_keras", None, "also save the trained float weights of --keras_model as this "
                        "Keras file (.h5/.keras, else a SavedModel directory), the report beside it")
    # Any model file (nets/model_file_run.py): Keras 3 / tf_keras files, SavedModels, frozen graphs.
    flags.DEFINE_string("model", None, "a model file: .keras/.h5 (Keras 3 or tf_keras), a SavedModel directory or "
                        "a frozen graph .pb")
    flags.DEFINE_string("signature", "serving_default", "the SavedModel signature --model uses")
    flags.DEFINE_string("input_name", None, "the image input of --model where it has several (a signature's input "
                        "key, a frozen graph's placeholder)")
    flags.DEFINE_string("output_name", None, "the class-score output of --model where it has several (a signature's "
                        "output key, a frozen graph's tensor)")
    flags.DEFINE_string("save_model", None, "after training, save the fine-tuned --model in its own format here "
                        "(weights on the quantized grid), quant_report.json beside it")
    flags.DEFINE_enum("uql_calibrator", "max", ["max", "percentile", "mse", "entropy"],
                      "activation-range calibrator of --learner ptq")
    flags.DEFINE_integer("uql_calib_batches", 20, "training batches --learner ptq calibrates over")
    flags.DEFINE_float("uql_calib_percentile", 99.99, "percentile of --uql_calibrator=percentile, in (0, 100]")
    # Understanding a run (learners/analysis.py): fidelity in the report, --exec_mode analyze, histograms.
    flags.DEFINE_integer("uql_analysis_batches", 2, "evaluation batches the per-layer fidelity of quant_report.json "
                         "is measured on (end of a uniform or ptq run, --exec_mode eval)")
    flags.DEFINE_boolean("uql_histograms", False, "also write TensorBoard histograms of each quantized weight and "
                         "its codes with the fidelity (about 1.5 KB per weight layer)")

    # AdaRound (--learner ptq) and batch-norm re-estimation (--learner uniform), issue 34.
    flags.DEFINE_boolean("uql_adaround", False, "--learner ptq: learn each weight's rounding (down or up) on "
                         "calibration batches to minimise its layer's output error (AdaRound), before calibrating "
                         "the activation ranges")
    flags.DEFINE_integer("uql_adaround_iters", 500, "--uql_adaround: optimisation steps per weight layer")
    flags.DEFINE_integer("uql_adaround_batches", 4, "--uql_adaround: training batches whose layer inputs AdaRound "
                         "reconstructs (no labels used)")
    flags.DEFINE_integer("uql_bn_reestimate_batches", 0, "--learner uniform: after fine-tuning, recompute every "
                         "batch norm's moving mean and variance of the quantized network over this many training "
                         "batches (0: off)")


# PocketFlow's defaults of a run script where they differ from the shared ones (its ILSVRC-12 data set sets batch
# sizes 64 and 100; its ILSVRC-12 ResNet is ResNet-18); MobileNet's depthwise layers get one range per channel.
SCRIPT_DEFAULTS = {
    "resnet_at_ilsvrc12": {"batch_size": 64, "batch_size_eval": 100, "resnet_size": 18},
    "mobilenet_at_ilsvrc12": {"batch_size": 64, "batch_size_eval": 100, "uql_use_buckets": True},
}


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
)


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
_AUTO_BITS_ONLY = ("uql_equivalent_bits", "uql_w_bit_min", "uql_w_bit_max", "uql_sensitivity_batches")
_ACTIVATION_BUDGET_ONLY = ("uql_a_bit_min", "uql_a_bit_max")


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
            freeze_bn_delay=FLAGS.uql_freeze_bn_delay, quantize_layer_outputs=FLAGS.uql_quantize_layer_outputs)
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
