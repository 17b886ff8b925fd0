"""Build a ModelHelper from parsed flags; the run scripts name which one."""
import importlib
import os

from absl import flags

from learners.errors import UserError
from nets.errors import DataError

MODELS = ("resnet_at_cifar10", "resnet_at_fmnist", "convnet_at_fmnist", "resnet_at_ilsvrc12", "mobilenet_at_ilsvrc12",
          "mobilenet_at_fmnist", "transformer_at_fmnist")
# Models whose data set has no default location (the flag names the directory of their files).
_DATA_DIR_REQUIRED = {
    "resnet_at_cifar10": "the directory of CIFAR-10's binary release (data_batch_1.bin ... data_batch_5.bin, "
                         "test_batch.bin)",
    "resnet_at_ilsvrc12": "the directory of ILSVRC-12 TFRecords (train-*-of-*, validation-*-of-*)",
    "mobilenet_at_ilsvrc12": "the directory of ILSVRC-12 TFRecords (train-*-of-*, validation-*-of-*)",
}
# Flags only some run scripts read: {flag: (the models that read it, what to use instead)}.
_SCRIPT_FLAGS = {
    "resnet_size": (("resnet_at_cifar10", "resnet_at_fmnist", "resnet_at_ilsvrc12"), "a ResNet run script"),
    "mobilenet_version": (("mobilenet_at_ilsvrc12", "mobilenet_at_fmnist"), "a MobileNet run script"),
    "mobilenet_depth_mult": (("mobilenet_at_ilsvrc12", "mobilenet_at_fmnist"), "a MobileNet run script"),
    "image_size": (("resnet_at_ilsvrc12", "mobilenet_at_ilsvrc12"), "an ILSVRC-12 run script"),
    "batch_size_norm": (("resnet_at_ilsvrc12", "mobilenet_at_ilsvrc12"), "an ILSVRC-12 run script"),
    "transformer_tokens": (("transformer_at_fmnist",), "nets/transformer_at_fmnist_run.py"),
}
# The model-specific flags each model's ModelHelper takes.
_MODEL_FLAGS = {
    "resnet_at_cifar10": ("resnet_size",), "resnet_at_fmnist": ("resnet_size",),
    "resnet_at_ilsvrc12": ("resnet_size", "image_size", "batch_size_norm"),
    "mobilenet_at_ilsvrc12": ("mobilenet_version", "mobilenet_depth_mult", "image_size", "batch_size_norm"),
    "mobilenet_at_fmnist": ("mobilenet_version", "mobilenet_depth_mult"),
    "transformer_at_fmnist": ("transformer_tokens",),
}


def helper_kwargs(settings, with_resnet_size, model_flags=()):
    """The ModelHelper constructor arguments the flags give (model_flags: the model's own flags, by name)."""
    kwargs = dict(data_dir=settings.data_dir_local, batch_size=settings.batch_size,
                  batch_size_eval=settings.batch_size_eval, lrn_rate_init=settings.lrn_rate_init,
                  momentum=settings.momentum, loss_w_dcy=settings.loss_w_dcy, nb_epochs_rat=settings.nb_epochs_rat,
                  train_subset=settings.train_subset, eval_subset=settings.eval_subset, seed=settings.seed)
    if with_resnet_size:
        kwargs["resnet_size"] = settings.resnet_size
    for name in model_flags:
        kwargs[name] = getattr(settings, name)
    # Unset flags leave the model's own defaults (the ConvNet and ResNets differ in rate and decay).
    return {name: value for name, value in kwargs.items() if value is not None or name == "data_dir"}


def make_helper_for(model):
    """A function settings -> ModelHelper of nets.<model>; data problems become one-line errors."""
    if model not in MODELS:
        raise ValueError("model %r is not known; expected one of %s" % (model, ", ".join(MODELS)))

    def make(settings):
        _refuse_flags_of_other_scripts(settings, model)
        if model in _DATA_DIR_REQUIRED and settings.data_dir_local is None:
            raise UserError("--data_dir_local is not set; expected %s" % _DATA_DIR_REQUIRED[model])
        module = importlib.import_module("nets." + model)
        try:
            return module.ModelHelper(**helper_kwargs(settings, False, _MODEL_FLAGS.get(model, ())))
        except DataError:
            raise
        except ValueError as exc:
            raise UserError(str(exc))
    return make


# Flags only nets/keras_model_run.py reads, with the value that means "not given".
KERAS_FLAGS = (("keras_model", None), ("keras_unsafe", False), ("data_npz", None), ("dataset", None),
               ("uql_save_keras", None))
# Flags only nets/model_file_run.py reads.
MODEL_FILE_FLAGS = (("model", None), ("signature", "serving_default"), ("input_name", None), ("output_name", None),
                    ("save_model", None))


def _refuse_flags_of_other_scripts(settings, model):
    """A built-in model's run script would ignore the model-file scripts' flags and other models' flags."""
    for names, script in ((KERAS_FLAGS, "nets/keras_model_run.py for a Keras model"),
                          (MODEL_FILE_FLAGS, "nets/model_file_run.py for a model file")):
        for name, unset in names:
            if getattr(settings, name) != unset:
                raise UserError("--%s=%s has no effect with the %s run script; expected %s, or the flag left out"
                                % (name, getattr(settings, name), model, script))
    _refuse_script_flags(settings, model, "the %s run script" % model)


def _refuse_script_flags(settings, model, script):
    # Only parsed flags know whether the command line set a flag (their defaults are valid values).
    if not isinstance(settings, flags.FlagValues):
        return
    for name, (models, instead) in _SCRIPT_FLAGS.items():
        if model not in models and name in settings and settings[name].present:
            raise UserError("--%s=%s has no effect with %s; expected %s, or the flag left out"
                            % (name, getattr(settings, name), script, instead))


def write_file_float_checkpoint(helper, settings):
    """Save the float model as the helper builds it (a Keras file's weights) as a finished float checkpoint.

    Its global step is the helper's whole float budget, so the uniform and ptq learners take it as trained
    and start from the file's weights instead of training a float model first. Its settings record (with the
    digests of the model file and data) is written first, so a later run with another file is refused.
    Args:
      helper: the ModelHelper.
      settings: the parsed flags (--save_path is the checkpoint prefix).
    Returns:
      the checkpoint prefix.
    """
    # Imported here: the built-in run scripts never need the graph builder at this point.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from learners import full_precision, graphs, run_settings, training  # pylint: disable=import-outside-toplevel

    save_path = settings.save_path
    run_settings.write_record(save_path, full_precision.FullPrecLearner.name,
                              run_settings.float_settings(helper, settings))

    model = graphs.build_graph(helper, False)
    nb_iters = helper.nb_iters_train()
    with model.graph.as_default():
        step = tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver(var_list=model.model_variables + [step])
        set_step = step.assign(nb_iters)
        init_op = tf.compat.v1.global_variables_initializer()
    os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
    with graphs.new_session(model.graph) as sess:
        sess.run(init_op)
        sess.run(set_step)
        path = saver.save(sess, save_path, global_step=nb_iters, write_meta_graph=False)
    training.log("float model: the weights of the model file, saved as %s" % path)
    return path


def _file_helper(build, settings):
    """The ModelHelper `build()` makes of a model file (its ValueErrors one line), and for a uniform or ptq run
    with no float checkpoint yet, the file's weights saved as the finished float checkpoint."""
    from learners import training  # pylint: disable=import-outside-toplevel
    try:
        helper = build()
    except DataError:
        raise
    except ValueError as exc:
        raise UserError(str(exc))
    if settings.learner in ("uniform", "ptq") and settings.exec_mode == "train" \
            and training.find_checkpoint(settings.save_path, "full-prec")[0] is None:
        write_file_float_checkpoint(helper, settings)
    return helper


def make_keras_helper(settings):
    """A KerasModelHelper from the flags; for uniform/ptq training, the file's weights become the float checkpoint
    when --save_path holds none yet. Problems with the file or data become one-line errors."""
    from nets import keras_model  # pylint: disable=import-outside-toplevel  (needs tf_keras)

    _refuse_script_flags(settings, "keras_model", "nets/keras_model_run.py")
    for name, unset in MODEL_FILE_FLAGS:
        if getattr(settings, name) != unset:
            raise UserError("--%s=%s has no effect with nets/keras_model_run.py; expected nets/model_file_run.py "
                            "--model, or the flag left out" % (name, getattr(settings, name)))
    if settings.keras_model is None:
        raise UserError("--keras_model is not set; expected a .h5 or .keras file or a SavedModel directory")
    if (settings.data_npz is None) == (settings.dataset is None):
        raise UserError("expected exactly one of --data_npz (an .npz archive) and --dataset (fmnist or cifar10)")
    kwargs = helper_kwargs(settings, False)
    kwargs.update(keras_model=settings.keras_model, data_npz=settings.data_npz, dataset=settings.dataset,
                  keras_unsafe=settings.keras_unsafe)
    return _file_helper(lambda: keras_model.KerasModelHelper(**kwargs), settings)


def save_keras_after_training(helper, settings, results):
    """With --uql_save_keras: write the trained float weights as a Keras model, the quantization report beside it."""
    if not settings.uql_save_keras:
        return
    from learners import training  # pylint: disable=import-outside-toplevel
    from tfquant import files  # pylint: disable=import-outside-toplevel

    checkpoint = results["quant_checkpoint"] if isinstance(results, dict) else results
    path = settings.uql_save_keras
    helper.save_weights_from_checkpoint(checkpoint, path)
    training.log("Keras model with the weights of %s: %s" % (checkpoint, path))
    if isinstance(results, dict):
        report = os.path.normpath(path) + ".quant_report.json"
        with open(results["report"], "rb") as handle:
            files.write_atomically(report, handle.read())
        training.log("its quantization report: %s" % report)


def make_model_file_helper(settings):
    """The helper of nets/model_file_run.py: a tf_keras file through KerasModelHelper, any other format (Keras 3,
    SavedModel, frozen graph) through ModelFileHelper; the file's weights become the float checkpoint as for
    make_keras_helper. Problems with the file, the flags or the data become one-line errors."""
    from nets import keras_model, model_file, model_formats  # pylint: disable=import-outside-toplevel
    from nets.model_formats import saving  # pylint: disable=import-outside-toplevel

    _refuse_script_flags(settings, "model_file", "nets/model_file_run.py")
    for name in ("keras_model", "uql_save_keras"):
        if getattr(settings, name) is not None:
            raise UserError("--%s has no effect with nets/model_file_run.py; expected --%s"
                            % (name, "model" if name == "keras_model" else "save_model"))
    if settings.model is None:
        raise UserError("--model is not set; expected a .keras/.h5 file, a SavedModel directory or a frozen graph .pb")
    if (settings.data_npz is None) == (settings.dataset is None):
        raise UserError("expected exactly one of --data_npz (an .npz archive) and --dataset (fmnist or cifar10)")
    kind = model_formats.detect_format(settings.model)
    if kind == "tf_keras":
        for name, unset in MODEL_FILE_FLAGS[1:4]:
            if getattr(settings, name) != unset:
                raise UserError("--%s=%s has no effect for the tf_keras model %s; expected the flag left out"
                                % (name, getattr(settings, name), settings.model))
    elif settings.keras_unsafe:
        raise UserError("--keras_unsafe has no effect for the model %s (%s); Lambda layers load only from tf_keras "
                        "files" % (settings.model, kind))
    if kind not in ("tf_keras", "keras3") and settings.uql_fold_batch_norms:
        # The file froze its batch norms: x * gamma * rsqrt(var + eps) + ... and a conv's bias between it and
        # the batch norm are forms tfquant's folding pass does not match, so nothing would be folded.
        raise UserError("--uql_fold_batch_norms is not valid for the %s model %s: its batch norms are frozen affine "
                        "layers (trained as such) that the folding pass does not match; expected the flag left out"
                        % (kind, settings.model))
    if settings.save_model:
        if settings.learner not in ("uniform", "ptq") or settings.exec_mode != "train":
            raise UserError("--save_model=%s has no effect with --learner %s --exec_mode %s; expected --learner "
                            "uniform or ptq with --exec_mode train" % (settings.save_model, settings.learner,
                                                                      settings.exec_mode))
        saving.check_save_path(settings.save_model, kind, settings.uql_fold_batch_norms)
    kwargs = helper_kwargs(settings, False)
    kwargs.update(data_npz=settings.data_npz, dataset=settings.dataset)

    def build():
        if kind == "tf_keras":
            return keras_model.KerasModelHelper(keras_model=settings.model, keras_unsafe=settings.keras_unsafe,
                                                **kwargs)
        helper = model_file.ModelFileHelper(settings.model, kind, settings.signature, settings.input_name,
                                            settings.output_name, **kwargs)
        if kind == "keras3" and settings.uql_fold_batch_norms and not helper.batch_norms_train:
            # Known once loaded (before the float checkpoint is written): only a Keras 3 model rebuilt layer by
            # layer has batch norms the folding pass matches.
            raise UserError("--uql_fold_batch_norms is not valid for the Keras 3 model %s: it runs as its frozen "
                            "inference graph (see the note above), whose batch norms the folding pass does not "
                            "match; expected the flag left out" % settings.model)
        return helper
    helper = _file_helper(build, settings)
    helper.kind = kind
    return helper


def save_model_after_training(helper, settings, results):
    """With --save_model: the fine-tuned model in its file's format, the quantization report beside it."""
    if not settings.save_model:
        return
    from learners import training  # pylint: disable=import-outside-toplevel
    from nets.model_formats import saving  # pylint: disable=import-outside-toplevel
    from tfquant import files  # pylint: disable=import-outside-toplevel

    if not isinstance(results, dict):
        raise UserError("--save_model=%s is not valid with --learner %s; expected --learner uniform or ptq (a "
                        "quantized run)" % (settings.save_model, settings.learner))
    path = settings.save_model
    what = saving.save_model(helper, results["quant_checkpoint"], results["report"], path)
    training.log("the fine-tuned model as a %s: %s" % (what, path))
    report = os.path.normpath(path) + ".quant_report.json"
    with open(results["report"], "rb") as handle:
        files.write_atomically(report, handle.read())
    training.log("its quantization report: %s" % report)
