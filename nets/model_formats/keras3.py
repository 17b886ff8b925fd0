"""Keras 3 model files (.keras, and .h5 written by Keras 3) as frozen graphs.

Keras 3 and tf_keras live in one process: `import keras` is always Keras 3, whatever TF_USE_LEGACY_KERAS says
(that variable only decides what `tf.keras` is, and the run script sets it for tf_keras). Keras 3 cannot build
tf.compat.v1 graphs, so the file is loaded eagerly, its inference call (training=False) traced into a
tf.function and frozen; the frozen graph is what the learners import when nets.model_formats.keras3_graph cannot
rebuild the model layer by layer. Batch norm is then frozen (moving statistics, an affine layer whose scale and
offset train). Loading uses Keras's safe mode: a Lambda layer or
an unknown custom object is refused.
"""
import os
import re

import tensorflow as tf

from nets.model_formats import ModelFileError, concrete


def _keras():
    try:
        import keras  # pylint: disable=import-outside-toplevel  (only Keras 3 files need it)
    except ImportError:
        raise ModelFileError("Keras 3 is not installed; expected 'pip install keras'") from None
    return keras


def load_keras3_model(path):
    """The Keras 3 model of `path`, loaded eagerly in safe mode. Raises ModelFileError."""
    keras = _keras()
    fail = ModelFileError.for_path(path)
    try:
        with tf.init_scope():
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # pylint: disable=broad-except  (any failure of Keras on a user's file)
        message = " ".join(str(exc).split())
        if "Lambda" in message or "safe_mode" in message:
            raise fail("Keras 3 model %s holds a Lambda layer, whose Python code would run on loading; expected a "
                       "model without Lambda layers (export it with model.export(dir) and pass that SavedModel)"
                       % path) from None
        unknown = re.search(r"Could not locate (?:class|function) '([^']+)'", message)
        if unknown or "custom" in message.lower():
            raise fail("Keras 3 model %s uses a custom object Keras cannot rebuild here (%s); expected built-in "
                       "layers only (or export it with model.export(dir) and pass that SavedModel)"
                       % (path, unknown.group(1) if unknown else message[:160])) from None
        raise fail("Keras 3 model %s cannot be loaded (%s); expected a file written by Keras 3's model.save"
                   % (path, message[:200] or type(exc).__name__)) from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise fail("Keras 3 model %s has %d inputs and %d outputs; expected one image input and one output of "
                   "class scores" % (path, len(model.inputs), len(model.outputs)))
    return model


def load(path):
    """A Keras 3 file as a FileGraph; save_info holds the model (weights are written back into it)."""
    path = os.fspath(path)
    return freeze_model(load_keras3_model(path), path)


def freeze_model(model, path):
    """A loaded Keras 3 model's inference call (training=False) as a FileGraph; save_info holds the model."""
    shape = list(model.inputs[0].shape)
    spec = concrete.tensor_spec(shape, "input")
    with tf.init_scope():
        function = tf.function(lambda images: model(images, training=False)).get_concrete_function(spec)
        names = {id(weight.value.handle): weight.path for weight in model.weights}
        file_graph = concrete.freeze(function, path, "keras3", names, save_info={"keras_model": model})
    # Which Keras weight each frozen Const was, to write trained values back.
    by_name = {weight.path: weight for weight in model.weights}
    file_graph.save_info["weights"] = {
        const: by_name[concrete_path] for const, concrete_path in _const_paths(function, names).items()
        if concrete_path in by_name}
    return file_graph


def _const_paths(function, names):
    """{Const node name in the frozen graph: Keras weight path} from the function's captures."""
    found = {}
    for external, internal in function.graph.captures:
        path = names.get(id(external))
        if path is not None:
            found[internal.op.name] = path
    return found
