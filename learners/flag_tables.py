"""The run scripts' flags (but the four directory flags, learners/directory_flags.py), one table per concern: each row is (definer, name, default, [choices,] help), the
arguments of its absl DEFINE_* call. learners/flags.py defines them (define_flags) and validates them."""
from absl import flags

import tfquant

# What a run does, where it saves, and float training (PocketFlow's names).
RUN_FLAGS = (
    (flags.DEFINE_string, "export_dir", None,
     "--exec_mode export: directory the exported files go to"),
    (flags.DEFINE_boolean, "export_int8", False,
     "--exec_mode export: also write float and int8 TFLite models (int8 "
     "with the trained weight and activation ranges)"),
    (flags.DEFINE_boolean, "export_int8_calibration", False,
     "--exec_mode export with --export_int8: let the "
     "converter calibrate every activation range on training images instead"),
    (flags.DEFINE_boolean, "export_onnx", False,
     "--exec_mode export: also write model.onnx with QuantizeLinear/"
     "DequantizeLinear pairs carrying the trained ranges (needs tf2onnx and onnxruntime)"),
    (flags.DEFINE_integer, "batch_size", 128,
     "training batch size"),
    (flags.DEFINE_integer, "batch_size_eval", 500,
     "evaluation batch size"),
    (flags.DEFINE_float, "lrn_rate_init", None,
     "initial learning rate of float training (default: the model's)"),
    (flags.DEFINE_float, "momentum", 0.9,
     "momentum of the optimizer"),
    (flags.DEFINE_float, "loss_w_dcy", None,
     "weight decay factor (default: the model's)"),
    (flags.DEFINE_float, "nb_epochs_rat", 1.0,
     "fraction of the model's standard number of epochs"),
    (flags.DEFINE_integer, "summ_step", 100,
     "log progress and write summaries every this many iterations"),
    (flags.DEFINE_integer, "save_step", None,
     "save a checkpoint every this many iterations (default: every epoch)"),
    (flags.DEFINE_float, "save_secs", 600.0,
     "also save a checkpoint when this many seconds passed since the last"),
    (flags.DEFINE_integer, "seed", 0,
     "random seed of initialisation and data order"),
    (flags.DEFINE_boolean, "debug", False,
     "show tracebacks for user errors (and check that the workers are in "
     "sync every summ_step)"),
    (flags.DEFINE_integer, "train_subset", None,
     "use only the first N training images (quick runs, tests)"),
    (flags.DEFINE_integer, "eval_subset", None,
     "use only the first N test images (quick runs, tests)"),
    (flags.DEFINE_boolean, "adopt_checkpoints", False,
     "resume from checkpoints that have no settings record beside "
     "them (their settings are unknown), recording the current settings as theirs"),
)

# The models and data of the run scripts (the ILSVRC-12 and Transformer scripts: PocketFlow's names where it had them).
MODEL_FLAGS = (
    (flags.DEFINE_integer, "resnet_size", 20,
     "ResNet depth: 20, 32, 44, 56 or 110 (CIFAR-style scripts); 18, 34, 50 "
     "or 101 (nets/resnet_at_ilsvrc12_run.py, default 18)"),
    (flags.DEFINE_integer, "mobilenet_version", 1,
     "MobileNet's version (1 or 2)"),
    (flags.DEFINE_float, "mobilenet_depth_mult", 1.0,
     "MobileNet's depth multiplier"),
    (flags.DEFINE_float, "batch_size_norm", None,
     "the learning rate is lrn_rate_init * batch_size / batch_size_norm "
     "(ILSVRC-12 scripts; default: the model's, ResNet 256, MobileNet 96)"),
    (flags.DEFINE_integer, "image_size", 224,
     "side of the square images an ILSVRC-12 model reads (crops are "
     "resized to it)"),
    (flags.DEFINE_enum, "transformer_tokens", "patches", ["patches", "rows"],
     "the Transformer's tokens: 4x4 "
     "patches (49 tokens) or image rows (28 tokens)"),
    (flags.DEFINE_string, "data_dir_local", None,
     "data directory (default: the dataset's standard location)"),
)

# Quantization settings: PocketFlow's uql_ names keep their meaning; tfquant's additions follow its style.
QUANT_FLAGS = (
    (flags.DEFINE_integer, "uql_weight_bits", 4,
     "weight bits (1..16, 32 = float)"),
    (flags.DEFINE_integer, "uql_activation_bits", 32,
     "activation bits (1..16, 32 = float)"),
    (flags.DEFINE_boolean, "uql_use_buckets", False,
     "one range per bucket instead of per layer"),
    (flags.DEFINE_enum, "uql_bucket_type", "channel", ["channel", "split", "block"],
     "bucket type: channel (one range per output channel), split (pieces of the flattened "
     "weight) or block (per output channel, blocks of --uql_bucket_size input elements: the "
     "layout of onnxruntime's MatMulNBits)"),
    (flags.DEFINE_integer, "uql_bucket_size", 256,
     "elements per bucket for split and block buckets (block: a power "
     "of 2 >= 16)"),
    (flags.DEFINE_boolean, "uql_quantize_all_layers", False,
     "also quantize the first and last layers"),
    (flags.DEFINE_float, "uql_quant_epochs", 1.0,
     "epochs of quantized fine-tuning"),
    (flags.DEFINE_float, "uql_lrn_rate_init", 0.01,
     "initial learning rate of quantized fine-tuning (cosine decay)"),
    (flags.DEFINE_list, "uql_weight_overrides", [],
     "ordered regex=bits or regex=SPEC overrides for weight variable "
     "names, SPEC ':'-separated bits (1..16, float), grid (minmax, symmetric, lsq, ternary, binary) "
     "and buckets (none, channel, split[/N], block[/N]), e.g. conv1/.*=4:channel:symmetric; "
     "first full match wins"),
    (flags.DEFINE_list, "uql_activation_overrides", [],
     "ordered regex=bits overrides for activation op names"),
    (flags.DEFINE_list, "uql_layer_bits", [],
     "explicit weight bits per matmul-like layer in data-flow order"),
    (flags.DEFINE_enum, "uql_act_range", "ema", list(tfquant.config.ACT_RANGES),
     "activation ranges: batch min/max with moving averages at evaluation (ema), the current "
     "batch everywhere (batch, PocketFlow's behaviour), a learned clip level (pact) or a "
     "learned step size (lsq; LSQ+ offset for activations that can be negative)"),
    (flags.DEFINE_enum, "uql_weight_range", "minmax", list(tfquant.config.WEIGHT_RANGES),
     "weight ranges: max - min per range group (minmax, PocketFlow's), a learned step size "
     "per range group on a signed grid (lsq), codes -1/0/+1 times a per-group scale (ternary, "
     "TWN; 2 bits) or the sign times the group's mean |w| (binary; 1 bit)"),
    (flags.DEFINE_float, "uql_pact_decay", 2e-4,
     "L2 decay weight on PACT's clip levels (--uql_act_range pact)"),
    (flags.DEFINE_enum, "uql_weight_scheme", "asymmetric", list(tfquant.config.WEIGHT_SCHEMES),
     "weight grid: min/max (asymmetric, PocketFlow's) or zero point 0 on +-(2^(k-1)-1) "
     "(symmetric, what int8 kernels store)"),
    (flags.DEFINE_boolean, "uql_fold_batch_norms", False,
     "quantize conv/matmul weights folded with the batch norm "
     "that follows them (W * gamma / sigma), as they are deployed"),
    (flags.DEFINE_integer, "uql_freeze_bn_delay", None,
     "with --uql_fold_batch_norms: training step from which the "
     "moving statistics replace the batch statistics (default: never)"),
    (flags.DEFINE_enum, "uql_recompute_quantized", "none", list(tfquant.config.RECOMPUTE_CHOICES),
     "rebuild quantized weights ('weights') or weights and activations ('all') in the backward pass "
     "instead of keeping them: less peak memory, more work per step, the same results"),
    (flags.DEFINE_boolean, "uql_quantize_layer_outputs", False,
     "also quantize (with --uql_activation_bits and "
     "moving-average ranges) the model input, layer outputs no quantized activation covers "
     "(before residual adds, the logits) and residual sums, on the int8 runtimes' grid: the "
     "trained graph is then the int8 TFLite/ONNX model, and --export_int8 needs no "
     "calibration"),
    (flags.DEFINE_float, "uql_ema_decay", 0.99,
     "decay of the activation-range moving averages"),
)

# PocketFlow's distillation flags, with its defaults.
DISTILLATION_FLAGS = (
    (flags.DEFINE_boolean, "enbl_dst", False,
     "add a distillation loss from the float model (--learner uniform)"),
    (flags.DEFINE_float, "loss_w_dst", 4.0,
     "weight of the distillation loss"),
    (flags.DEFINE_float, "tempr_dst", 4.0,
     "temperature of the distillation softmax"),
)

# Automatic bit allocation (issue 12); PocketFlow's budget names keep their meaning.
ALLOCATION_FLAGS = (
    (flags.DEFINE_boolean, "uql_auto_bits", False,
     "choose weight (and with --uql_a_equivalent_bits, activation) bits "
     "per layer: least measured sensitivity within the budget, solved exactly"),
    (flags.DEFINE_float, "uql_equivalent_bits", 4.0,
     "weight budget: sum(bits * |W|) <= this * sum(|W|) over the "
     "quantized layers (--uql_auto_bits)"),
    (flags.DEFINE_integer, "uql_w_bit_min", 2,
     "narrowest weight width --uql_auto_bits may choose"),
    (flags.DEFINE_integer, "uql_w_bit_max", 8,
     "widest weight width --uql_auto_bits may choose"),
    (flags.DEFINE_float, "uql_a_equivalent_bits", None,
     "activation budget: mean activation bits weighted by "
     "activation size (--uql_auto_bits; off unless given)"),
    (flags.DEFINE_integer, "uql_a_bit_min", 2,
     "narrowest activation width --uql_auto_bits may choose"),
    (flags.DEFINE_integer, "uql_a_bit_max", 8,
     "widest activation width --uql_auto_bits may choose"),
    (flags.DEFINE_integer, "uql_sensitivity_batches", 1,
     "training batches the sensitivities are measured on "
     "(--uql_auto_bits)"),
    (flags.DEFINE_integer, "uql_w_measured_widths", 4,
     "narrowest weight widths whose sensitivity is measured by loss runs; "
     "wider ones are estimated to first order (--uql_auto_bits; 0: all measured)"),
    (flags.DEFINE_integer, "uql_a_measured_widths", 2,
     "narrowest activation widths whose sensitivity is measured by loss runs; "
     "wider ones are estimated to first order (--uql_a_equivalent_bits; 0: all measured)"),
    (flags.DEFINE_boolean, "uql_enbl_rl_agent", False,
     "PocketFlow's RL agent; not available (use --uql_auto_bits)"),
)

# Multi-worker training (learners/distributed.py).
DISTRIBUTED_FLAGS = (
    (flags.DEFINE_integer, "nb_workers", 1,
     "worker processes to start on this machine (./run_local.sh starts them); "
     "on a cluster set TF_CONFIG on every machine instead"),
    (flags.DEFINE_boolean, "enbl_lrn_rate_scaling", True,
     "with several workers, multiply the learning rate by the "
     "number of workers (PocketFlow's multi-GPU scaling for its larger global batch)"),
    (flags.DEFINE_float, "collective_timeout_secs", 40.0,
     "with several workers, stop when a step waits this long for "
     "the others (a dead or stopped worker)"),
)

# Your own model and data: nets/keras_model_run.py, and any model file (nets/model_file_run.py: Keras 3 / tf_keras
# files, SavedModels, frozen graphs).
MODEL_FILE_FLAGS = (
    (flags.DEFINE_string, "keras_model", None,
     "a tf_keras model: .h5 or .keras file, or a SavedModel directory"),
    (flags.DEFINE_boolean, "keras_unsafe", False,
     "load Lambda layers of --keras_model (runs code from the file)"),
    (flags.DEFINE_string, "data_npz", None,
     "an .npz archive with x_train, y_train, x_test, y_test"),
    (flags.DEFINE_enum, "dataset", None, ["fmnist", "cifar10"],
     "a built-in data set for --keras_model"),
    (flags.DEFINE_string, "uql_save_keras", None,
     "also save the trained float weights of --keras_model as this "
     "Keras file (.h5/.keras, else a SavedModel directory), the report beside it"),
    (flags.DEFINE_string, "model", None,
     "a model file: .keras/.h5 (Keras 3 or tf_keras), a SavedModel directory or "
     "a frozen graph .pb"),
    (flags.DEFINE_string, "signature", "serving_default",
     "the SavedModel signature --model uses"),
    (flags.DEFINE_string, "input_name", None,
     "the image input of --model where it has several (a signature's input "
     "key, a frozen graph's placeholder)"),
    (flags.DEFINE_string, "output_name", None,
     "the class-score output of --model where it has several (a signature's "
     "output key, a frozen graph's tensor)"),
    (flags.DEFINE_string, "save_model", None,
     "after training, save the fine-tuned --model in its own format here "
     "(weights on the quantized grid), quant_report.json beside it"),
)

# Post-training calibration (--learner ptq), AdaRound and batch-norm re-estimation (issue 34).
POST_TRAINING_FLAGS = (
    (flags.DEFINE_enum, "uql_calibrator", "max", ["max", "percentile", "mse", "entropy"],
     "activation-range calibrator of --learner ptq"),
    (flags.DEFINE_integer, "uql_calib_batches", 20,
     "training batches --learner ptq calibrates over"),
    (flags.DEFINE_float, "uql_calib_percentile", 99.99,
     "percentile of --uql_calibrator=percentile, in (0, 100]"),
    (flags.DEFINE_boolean, "uql_adaround", False,
     "--learner ptq: learn each weight's rounding (down or up) on "
     "calibration batches to minimise its layer's output error (AdaRound), before calibrating "
     "the activation ranges"),
    (flags.DEFINE_integer, "uql_adaround_iters", 500,
     "--uql_adaround: optimisation steps per weight layer"),
    (flags.DEFINE_integer, "uql_adaround_batches", 2,
     "--uql_adaround: training batches whose layer inputs AdaRound "
     "reconstructs (no labels used)"),
    (flags.DEFINE_integer, "uql_bn_reestimate_batches", 0,
     "--learner uniform: after fine-tuning, recompute every "
     "batch norm's moving mean and variance of the quantized network over this many training "
     "batches (0: off)"),
)

# Understanding a run (learners/analysis.py): fidelity in the report, --exec_mode analyze, histograms.
ANALYSIS_FLAGS = (
    (flags.DEFINE_integer, "uql_analysis_batches", 2,
     "evaluation batches the per-layer fidelity of quant_report.json "
     "is measured on (end of a uniform or ptq run, --exec_mode eval)"),
    (flags.DEFINE_boolean, "uql_histograms", False,
     "also write TensorBoard histograms of each quantized weight and "
     "its codes with the fidelity (about 1.5 KB per weight layer)"),
)

# Low-bit training recipes (issue 34; learners/recipes.py), each off unless given.
RECIPE_FLAGS = (
    (flags.DEFINE_enum, "uql_range_optimizer", "shared", ["shared", "adam", "momentum", "sgd"],
     "--learner uniform: optimizer of the learned ranges (LSQ step sizes and offsets, PACT clip "
     "levels): shared (the weights' Momentum optimizer and decay) or an optimizer of their own "
     "without weight decay (PACT's decay included), at --uql_range_lrn_rate"),
    (flags.DEFINE_float, "uql_range_lrn_rate", 1e-3,
     "initial learning rate of --uql_range_optimizer (cosine decay over "
     "the fine-tuning, as the weights')"),
    (flags.DEFINE_float, "uql_low_bit_weight_decay_scale", None,
     "--learner uniform: multiply the weight decay of every "
     "weight whose layer has at most 2-bit weights by this factor (default: off)"),
    (flags.DEFINE_boolean, "uql_track_oscillations", False,
     "--learner uniform: measure how often each quantized "
     "weight's integer code flips back and forth (EMA of reversals per step, Nagel et al. 2022); "
     "results.json and the summary report the fraction of oscillating weights"),
    (flags.DEFINE_float, "uql_freeze_oscillations", None,
     "--learner uniform: freeze every weight whose oscillation "
     "frequency exceeds this threshold (in (0, 1)) to its EMA-rounded code; implies "
     "--uql_track_oscillations (default: off)"),
    (flags.DEFINE_list, "uql_progressive_bits", [],
     "--learner uniform: widths the fine-tuning steps train at in turn, widest "
     "first, e.g. 8,4,2 (even split of --uql_quant_epochs); the last must be the run's width "
     "(--uql_weight_bits); each layer trains at max(phase width, its own width) (default: off)"),
)

# learners/flags.py defines them in this order (absl lists them by name in --help).
TABLES = (RUN_FLAGS, MODEL_FLAGS, QUANT_FLAGS, DISTILLATION_FLAGS, ALLOCATION_FLAGS, DISTRIBUTED_FLAGS,
          MODEL_FILE_FLAGS, POST_TRAINING_FLAGS, RECIPE_FLAGS, ANALYSIS_FLAGS)
