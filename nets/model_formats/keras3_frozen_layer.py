"""One Keras 3 layer that keras3_graph does not map, as its frozen inference graph inside a rebuilt model.

A layer called with one tensor in several places (self-attention, MultiHeadAttention(x, x)) counts as called on
that one tensor.

The layer's training=False call on its one input is traced, frozen (nets.model_formats.concrete) and prepared
(graph_import) like a whole file, so its weights become variables named by their Keras paths and the rest of
the model still trains as Keras would. Inside the layer, batch norms keep their moving statistics and dropout
is off: the reason the rebuild names such layers in its note.
"""
import tensorflow as tf

from nets.model_formats import ModelFileError, concrete, graph_import

tf1 = tf.compat.v1


def freeze_layer(layer, path, repeats=1):
    """The prepared frozen graph of `layer`'s inference call, or a reason (str) why it cannot be frozen.

    Args:
      layer: a Keras 3 layer with one output, called on one tensor.
      path: the model file, for messages.
      repeats: how many times the call passes that tensor (2 for self-attention: MultiHeadAttention(x, x)).
    Returns:
      a graph_import.PreparedGraph, or a str.
    """
    try:
        one = layer.input if repeats == 1 else layer.input[0]
        shape = list(one.shape)
        if not isinstance(layer.output, type(one)):
            return "more than one output"
    except (AttributeError, ValueError, IndexError, TypeError):
        return "not one input and one output"
    try:
        with tf.init_scope():
            spec = tf.TensorSpec(shape, tf.float32, name="input")
            function = tf.function(lambda inputs: layer(*[inputs] * repeats, training=False)).get_concrete_function(
                spec)
            names = {id(weight.value.handle): weight.path for weight in layer.weights}
            prepared = graph_import.prepare(concrete.freeze(function, path, "keras3", names))
    except ModelFileError as exc:
        return str(exc)
    except Exception as exc:  # pylint: disable=broad-except  (whatever Keras or TensorFlow says of a user's layer)
        return "cannot be traced (%s)" % " ".join(str(exc).split())[:120]
    if prepared.output_is_softmax:
        return "ends in a softmax"  # prepare() would leave it out, as it does for a whole model's head
    return prepared


def frozen_variable_paths(layer, prepared):
    """{Keras weight path: variable name} of the layer's weights that became variables."""
    made = {parameter.name for parameter in prepared.parameters.values()}
    return {weight.path: concrete.variable_name(weight.path) for weight in layer.weights
            if concrete.variable_name(weight.path) in made}


def import_layer(prepared, inputs, name):
    """The frozen layer on `inputs` (inside the caller's variable scope); returns its output tensor."""
    return graph_import.import_graph(prepared, inputs, scope_name=name)
