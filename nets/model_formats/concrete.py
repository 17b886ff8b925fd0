"""A TF2 concrete function (a Keras 3 model's call, a SavedModel signature) frozen into a FileGraph.

convert_variables_to_constants_v2 replaces each captured variable's placeholder inside the function by a Const
of the same name; the function's captures say which variable that was, so the Const can become a variable of
the same name (and trainability) again in the training graph.
"""
import re

import tensorflow as tf
from tensorflow.python.framework import convert_to_constants  # the one public-in-practice freezer of TF2

from nets.model_formats import FileGraph, ModelFileError

_INVALID_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.\-/]")


def variable_name(name):
    """A variable name ('conv2d/kernel:0' -> 'conv2d/kernel') with characters TensorFlow refuses replaced."""
    name = name[:-2] if name.endswith(":0") else name
    name = _INVALID_NAME_CHARACTERS.sub("_", name).strip("/") or "weight"
    return name if re.match(r"[A-Za-z0-9.]", name) else "w" + name


def freeze(function, path, kind, variable_names=None, save_info=None):
    """Freeze `function` (one tensor input, one tensor output) into a FileGraph.

    Args:
      function: a ConcreteFunction.
      path: the model file (for messages).
      kind: the FileGraph kind.
      variable_names: {id(variable handle): name} for names better than the variable's own (Keras paths).
      save_info: passed through to the FileGraph.
    Returns:
      a FileGraph whose `variables` maps each former variable's Const to (name, trainable).
    Raises:
      ModelFileError when the function cannot be frozen.
    """
    fail = ModelFileError.for_path(path)
    handles = {}
    for variable in function.variables:
        handles[id(variable.handle)] = variable
    captured = {}
    for external, internal in function.graph.captures:
        variable = handles.get(id(external))
        if variable is not None:
            captured[internal.op.name] = variable
    try:
        frozen = convert_to_constants.convert_variables_to_constants_v2(function)
    except Exception as exc:  # pylint: disable=broad-except  (whatever TensorFlow says of a user's function)
        raise fail("model %s cannot be frozen into a graph (%s); expected a forward pass of plain TensorFlow ops"
                   % (path, " ".join(str(exc).split())[:200])) from None
    graph_def = frozen.graph.as_graph_def()
    if len(frozen.inputs) != 1 or len(frozen.outputs) != 1:
        raise fail("model %s has %d inputs and %d outputs; expected one image input and one output of class scores"
                   % (path, len(frozen.inputs), len(frozen.outputs)))
    names, used = {}, set()
    for node_name, variable in captured.items():
        if not variable.dtype.is_floating:
            continue  # counters and seeds stay constants
        name = variable_name((variable_names or {}).get(id(variable.handle)) or variable.name)
        unique, index = name, 1
        while unique in used:
            unique, index = "%s_%d" % (name, index), index + 1
        used.add(unique)
        names[node_name] = (unique, bool(variable.trainable))
    return FileGraph(path=path, kind=kind, graph_def=graph_def, input_name=frozen.inputs[0].name,
                     output_name=frozen.outputs[0].name, input_shape=frozen.inputs[0].shape.as_list(),
                     variables=names, save_info=save_info or {})


def tensor_spec(shape, name):
    """A float32 TensorSpec of `shape` with a free batch dimension."""
    return tf.TensorSpec([None] + list(shape[1:]), tf.float32, name=name)
