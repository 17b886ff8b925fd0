"""SavedModel directories (Keras 3 model.export, tf.saved_model.save of a tf.Module, TF1 builders) as frozen graphs.

tf.saved_model.load reads all three; a signature is a ConcreteFunction taking keyword tensors and returning a
dict, frozen like any other (see concrete).
"""
import os

import tensorflow as tf

from nets.model_formats import ModelFileError, concrete


def _pick(keys, wanted, what, path, flag):
    """The one key of `keys` to use: `wanted`, or the only one."""
    keys = sorted(keys)
    if wanted is not None:
        if wanted not in keys:
            raise ModelFileError("SavedModel %s has no %s %r; expected one of %s (%s)"
                                 % (path, what, wanted, ", ".join(keys), flag), path=path)
        return wanted
    if len(keys) != 1:
        raise ModelFileError("SavedModel %s has %d %ss (%s); expected %s naming one"
                             % (path, len(keys), what, ", ".join(keys), flag), path=path)
    return keys[0]


def load(path, signature="serving_default", input_name=None, output_name=None):
    """A SavedModel's signature as a FileGraph; save_info records the signature and its input/output keys."""
    path = os.fspath(path)
    fail = ModelFileError.for_path(path)
    try:
        with tf.init_scope():
            loaded = tf.saved_model.load(path)
    except Exception as exc:  # pylint: disable=broad-except  (whatever TensorFlow says of a user's directory)
        raise fail("SavedModel %s cannot be loaded (%s); expected a directory written by tf.saved_model.save, "
                   "model.export or a SavedModelBuilder" % (path, " ".join(str(exc).split())[:200])) from None
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if signature not in signatures:
        raise fail("SavedModel %s has no signature %r; expected --signature naming one of: %s"
                   % (path, signature, ", ".join(sorted(signatures)) or "(none: save it with signatures=...)"))
    function = signatures[signature]
    inputs = function.structured_input_signature[1]
    input_key = _pick(inputs, input_name, "input", path, "--input_name")
    spec = inputs[input_key]
    if not spec.dtype.is_floating or spec.shape.rank is None or spec.shape.rank < 2:
        raise fail("SavedModel %s: input %r of signature %r is %s %s; expected float images [batch, ...]"
                   % (path, input_key, signature, spec.dtype.name, spec.shape))
    others = [key for key in inputs if key != input_key]
    if others:
        raise fail("SavedModel %s: signature %r takes the inputs %s besides %r; expected a signature of one image "
                   "input" % (path, signature, ", ".join(sorted(others)), input_key))
    outputs = function.structured_outputs
    output_key = _pick(outputs, output_name, "output", path, "--output_name")

    def single(images):
        return function(**{input_key: images})[output_key]

    with tf.init_scope():
        try:
            single_function = tf.function(single).get_concrete_function(
                concrete.tensor_spec(spec.shape.as_list(), input_key))
        except Exception as exc:  # pylint: disable=broad-except
            raise fail("SavedModel %s: signature %r cannot be traced (%s)"
                       % (path, signature, " ".join(str(exc).split())[:200])) from None
        file_graph = concrete.freeze(single_function, path, "saved_model")
    file_graph.save_info.update(signature=signature, input_key=input_key, output_key=output_key,
                                other_outputs=sorted(key for key in outputs if key != output_key),
                                input_shape=spec.shape.as_list())
    return file_graph
