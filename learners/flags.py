"""absl flags for the run scripts. PocketFlow's names keep their meaning; tfquant adds a few."""
import math
import os

from absl import flags

import tfquant
from learners.errors import UserError

FLAGS = flags.FLAGS
LEARNERS = ("full-prec", "uniform")


def define_flags():
    """Define every flag once (run scripts and tests may call this repeatedly)."""
    if "learner" in FLAGS:
        return
    flags.DEFINE_enum("learner", "full-prec", list(LEARNERS), "learner: full-prec or uniform")
    flags.DEFINE_enum("exec_mode", "train", ["train", "eval", "export"],
                      "train, eval the latest checkpoint, or export it (--learner uniform, --export_dir)")
    flags.DEFINE_string("export_dir", None, "--exec_mode export: directory the exported files go to")
    flags.DEFINE_boolean("export_int8", False, "--exec_mode export: also write float and int8 TFLite models")
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
    flags.DEFINE_integer("resnet_size", 20, "ResNet depth: 20, 32, 44, 56 or 110")
    flags.DEFINE_string("data_dir_local", None, "data directory (default: the dataset's standard location)")
    flags.DEFINE_integer("uql_weight_bits", 4, "weight bits (1..16, 32 = float)")
    flags.DEFINE_integer("uql_activation_bits", 32, "activation bits (1..16, 32 = float)")
    flags.DEFINE_boolean("uql_use_buckets", False, "one range per bucket instead of per layer")
    flags.DEFINE_enum("uql_bucket_type", "channel", ["channel", "split"], "bucket type: channel or split")
    flags.DEFINE_integer("uql_bucket_size", 256, "elements per bucket for split buckets")
    flags.DEFINE_boolean("uql_quantize_all_layers", False, "also quantize the first and last layers")
    flags.DEFINE_float("uql_quant_epochs", 1.0, "epochs of quantized fine-tuning")
    flags.DEFINE_string("uql_save_quant_model_path", "./models_uql/model.ckpt",
                        "quantized model checkpoint path prefix")
    # tfquant's additions.
    flags.DEFINE_float("uql_lrn_rate_init", 0.01, "initial learning rate of quantized fine-tuning (cosine decay)")
    flags.DEFINE_list("uql_weight_overrides", [], "ordered regex=bits overrides for weight variable names; "
                      "first full match wins")
    flags.DEFINE_list("uql_activation_overrides", [], "ordered regex=bits overrides for activation op names")
    flags.DEFINE_list("uql_layer_bits", [], "explicit weight bits per matmul-like layer in data-flow order")
    flags.DEFINE_enum("uql_act_range", "ema", list(tfquant.config.ACT_RANGES),
                      "activation ranges: batch min/max with moving averages at evaluation (ema), the current "
                      "batch everywhere (batch, PocketFlow's behaviour), a learned clip level (pact) or a "
                      "learned step size (lsq; LSQ+ offset for activations that can be negative)")
    flags.DEFINE_enum("uql_weight_range", "minmax", list(tfquant.config.WEIGHT_RANGES),
                      "weight ranges: max - min per range group (minmax, PocketFlow's) or a learned step size "
                      "per range group on a signed grid (lsq)")
    flags.DEFINE_float("uql_pact_decay", 2e-4, "L2 decay weight on PACT's clip levels (--uql_act_range pact)")
    # PocketFlow's distillation flags, with its defaults.
    flags.DEFINE_boolean("enbl_dst", False, "add a distillation loss from the float model (--learner uniform)")
    flags.DEFINE_float("loss_w_dst", 4.0, "weight of the distillation loss")
    flags.DEFINE_float("tempr_dst", 4.0, "temperature of the distillation softmax")
    flags.DEFINE_float("uql_ema_decay", 0.99, "decay of the activation-range moving averages")
    flags.DEFINE_integer("train_subset", None, "use only the first N training images (quick runs, tests)")
    flags.DEFINE_integer("eval_subset", None, "use only the first N test images (quick runs, tests)")
    flags.DEFINE_integer("seed", 0, "random seed of initialisation and data order")
    flags.DEFINE_boolean("debug", False, "show tracebacks for user errors")


def _positive(name, minimum=1):
    value = getattr(FLAGS, name)
    if value is not None and value < minimum:
        raise UserError("--%s=%s is not valid; expected a value >= %s" % (name, value, minimum))


def _writable_parent(name, path):
    directory = os.path.dirname(os.path.abspath(path)) or "."
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
    for name in ("batch_size", "batch_size_eval", "summ_step", "save_step"):
        _positive(name)
    for name in ("train_subset", "eval_subset"):
        _positive(name)
    for name in ("lrn_rate_init", "uql_lrn_rate_init", "nb_epochs_rat", "uql_quant_epochs", "save_secs"):
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
    if FLAGS.exec_mode == "export" and FLAGS.learner != "uniform":
        raise UserError("--exec_mode=export is not valid with --learner=%s; expected --learner=uniform (export "
                        "packs a quantized checkpoint)" % FLAGS.learner)
    if FLAGS.exec_mode == "export" and not FLAGS.export_dir:
        raise UserError("--export_dir is not set; expected the directory --exec_mode=export writes the exported "
                        "files to")
    if FLAGS.data_dir_local is not None and not os.path.isdir(FLAGS.data_dir_local):
        raise UserError("--data_dir_local=%s is not valid; expected an existing directory" % FLAGS.data_dir_local)
    for name in ("save_path", "uql_save_quant_model_path"):
        _writable_parent(name, getattr(FLAGS, name))
    _writable_parent("log_dir", os.path.join(FLAGS.log_dir, "x"))
    quant_config()  # bit widths, overrides and bucket settings are checked by tfquant itself


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
            pact_decay=FLAGS.uql_pact_decay, weight_range=FLAGS.uql_weight_range)
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
    ("act_range", "uql_act_range"))
