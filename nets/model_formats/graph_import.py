"""A FileGraph imported into a learner's tf.compat.v1 graph with its weights turned back into variables.

Which Consts become variables: every float Const that was a variable in the file (Keras 3 files, SavedModels:
trainable as it was there); in a frozen graph, where nobody says, the weights of Conv2D / MatMul / depthwise /
BatchMatMul ops, BiasAdd biases, batch-norm parameters (FusedBatchNorm inputs; the unfused
x * gamma * rsqrt(var + eps) + ... form) and float Consts of rank >= 1 that elementwise ops combine with the
data. Variances (a FusedBatchNorm's inputs 3 and 4, what an Rsqrt or Sqrt reads) and moving statistics stay
non-trainable: the file's batch norms were frozen, so they train as an affine layer. An Einsum of the data by a
constant 2-D weight on its last axis ('bi,io->bo', 'btc,cd->btd') becomes the BatchMatMulV2 it equals, so its
weight is quantized; an Einsum of another form reading a constant is refused.
"""
import dataclasses
from typing import Dict

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import tensor_util

from nets.model_formats import ModelFileError
from nets.model_formats.concrete import variable_name
from tfquant import match

tf1 = tf.compat.v1

_WEIGHT_OPS = match.WEIGHT_OP_TYPES
_ELEMENTWISE_OPS = ("Mul", "Add", "AddV2", "Sub", "RealDiv", "BiasAdd", "Maximum", "Minimum")
_BATCH_NORM_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
_ROOT_OPS = ("Rsqrt", "Sqrt")
# Ops whose body is not in the graph (function calls, control flow): the rewriter sees none of it.
_OPAQUE_OPS = ("PartitionedCall", "StatefulPartitionedCall", "While", "StatelessWhile", "If", "StatelessIf",
               "Enter", "Exit", "Merge", "Switch", "NextIteration", "LoopCond", "Case", "StatelessCase")
# Ops that read a weight tfquant cannot quantize; training them float would report a model as quantized that is not.
_REFUSED_WEIGHT_OPS = tuple(match.UNSUPPORTED_WEIGHT_OP_TYPES) + ("Einsum",)


@dataclasses.dataclass
class Parameter:
    """One Const of the file made a variable: its value, variable name and whether it trains."""

    const_name: str
    name: str
    value: np.ndarray
    trainable: bool
    source_const: str = ""  # the file's Const this one was reshaped from ('' when none)


@dataclasses.dataclass
class PreparedGraph:
    """The file's graph without its parameter Consts and input placeholder, ready to import."""

    graph_def: object
    input_name: str
    logits_name: str
    output_is_softmax: bool
    parameters: Dict[str, Parameter]
    path: str = ""


def _node_of(name):
    return name.lstrip("^").split(":")[0]


def _strip_identities(nodes, name):
    """The node a tensor name resolves to through Identity ops."""
    node = nodes.get(_node_of(name))
    for _ in range(16):
        if node is None or node.op not in ("Identity", "Snapshot") or not node.input:
            return node
        node = nodes.get(_node_of(node.input[0]))
    return node


def _is_float_const(node):
    return node is not None and node.op == "Const" and tf.as_dtype(node.attr["dtype"].type).is_floating


def _frozen_graph_parameters(nodes):
    """{Const name: trainable} of a frozen graph's parameters (see the module docstring)."""
    found = {}
    for node in nodes.values():
        data_inputs = [name for name in node.input if not name.startswith("^")]
        for index, name in enumerate(data_inputs):
            const = _strip_identities(nodes, name)
            if not _is_float_const(const):
                continue
            rank = len(const.attr["value"].tensor.tensor_shape.dim)
            if node.op in _WEIGHT_OPS or node.op in _BATCH_NORM_OPS and index >= 1:
                found[const.name] = found.get(const.name, True) and not (node.op in _BATCH_NORM_OPS and index >= 3)
            elif node.op in _ROOT_OPS or node.op in ("Add", "AddV2") and _reads_root(nodes, node):
                # Checked before the elementwise ops (Add is one): a variance trained freely goes negative and
                # the Rsqrt after it turns every weight to NaN.
                if rank >= 1:
                    found[const.name] = False
            elif node.op in _ELEMENTWISE_OPS and rank >= 1:
                found.setdefault(const.name, True)
    return found


def _reads_root(nodes, node):
    """True when an Add's only readers are Rsqrt/Sqrt (var + eps of an unfused batch norm)."""
    readers = [other for other in nodes.values() if any(_node_of(name) == node.name for name in other.input)]
    return bool(readers) and all(reader.op in _ROOT_OPS for reader in readers)


def _needed_by(graph_def, output_op, path, output_name):
    """The GraphDef of the nodes `output_op` depends on, in their order (the graph's own pruning, without its
    deprecation notice)."""
    nodes = {node.name: node for node in graph_def.node}
    if output_op not in nodes:
        raise ModelFileError("model %s: its graph has no op %s; expected --output_name naming the output tensor"
                             % (path, output_name), path=path)
    needed, stack = set(), [output_op]
    while stack:
        name = stack.pop()
        if name in needed or name not in nodes:
            continue
        needed.add(name)
        stack.extend(_node_of(source) for source in nodes[name].input)
    pruned = tf1.GraphDef()
    pruned.versions.CopyFrom(graph_def.versions)
    pruned.library.CopyFrom(graph_def.library)
    pruned.node.extend(node for node in graph_def.node if node.name in needed)
    return pruned


def _matmul_equation(equation):
    """Whether an Einsum equation is a matmul of data by a 2-D weight on its last axis ('btc,cd->btd')."""
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    data, comma, weight = inputs.partition(",")
    if not arrow or not comma or "." in equation or len(weight) != 2 or not data:
        return False
    reduced, kept = weight
    return (len(set(data)) == len(data) and data[-1] == reduced and reduced != kept and kept not in data
            and output == data[:-1] + kept)


def _einsums_as_matmuls(graph_def, nodes):
    """Turn each Einsum of data by a constant 2-D weight on the last axis into the BatchMatMulV2 it equals
    (BatchMatMulV2 broadcasts the weight over the batch axes), so tfquant quantizes its weight; other Einsums
    stay and are refused when they read a constant."""
    for node in graph_def.node:
        if node.op != "Einsum" or len(node.input) != 2 or not _is_float_const(_strip_identities(nodes, node.input[1])):
            continue
        if not _matmul_equation(node.attr["equation"].s.decode("utf-8", "replace")):
            continue
        dtype = node.attr["T"].type
        node.op = "BatchMatMulV2"
        node.attr.clear()
        node.attr["T"].type = dtype
        node.attr["adj_x"].b = False
        node.attr["adj_y"].b = False


def _fold_weight_reshapes(graph_def, nodes, variables):
    """Replace Reshape(weight Const, shape Const) feeding a weight op by the reshaped Const (Keras 3's EinsumDense
    reshapes its kernel for a BatchMatMul), so the op reads a variable directly and tfquant quantizes it.

    Args:
      graph_def: edited in place; nodes: its nodes by name; variables: {Const: (name, trainable)} of the file or
        None, updated to name the new Consts.
    Returns:
      {new Const name: the Const it was reshaped from}.
    """
    readers = {}
    for node in graph_def.node:
        for name in node.input:
            readers.setdefault(_node_of(name), []).append(node.name)
    done = {}
    for node in list(graph_def.node):
        if node.op not in _WEIGHT_OPS:
            continue
        for name in node.input[:2]:
            reshape = _strip_identities(nodes, name)
            if reshape is None or reshape.op != "Reshape" or reshape.name in done:
                continue
            source, shape = (_strip_identities(nodes, reshape.input[i]) for i in (0, 1))
            if not _is_float_const(source) or shape is None or shape.op != "Const" \
                    or (variables is not None and source.name not in variables) \
                    or len(readers.get(source.name, [])) != 1:
                continue
            value = tensor_util.MakeNdarray(source.attr["value"].tensor)
            try:
                value = value.reshape(tensor_util.MakeNdarray(shape.attr["value"].tensor))
            except ValueError:
                continue
            dtype = reshape.attr["T"].type
            reshape.op = "Const"
            del reshape.input[:]
            reshape.attr.clear()
            reshape.attr["dtype"].type = dtype
            reshape.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(value))
            done[reshape.name] = source.name
            if variables is not None:
                variables[reshape.name] = variables.pop(source.name)
    return done


def prepare(file_graph):
    """Check the file's graph and split its parameters from it.

    Returns:
      a PreparedGraph.
    Raises:
      ModelFileError naming the file: ops the rewriter cannot see into or quantize, a missing output, a damaged
      graph (any attribute or tensor that does not parse).
    """
    try:
        return _prepare(file_graph)
    except ModelFileError:
        raise
    except Exception as exc:  # pylint: disable=broad-except  (a damaged file can break any read of its protos)
        raise ModelFileError("model %s: its graph is damaged (%s: %s); expected the file as TensorFlow wrote it"
                             % (file_graph.path, type(exc).__name__, " ".join(str(exc).split())[:160]),
                             path=file_graph.path) from None


def _prepare(file_graph):
    """prepare() without the catch-all for damaged files."""
    path = file_graph.path
    fail = ModelFileError.for_path(path)
    output_op = _node_of(file_graph.output_name)
    graph_def = tf1.GraphDef()
    graph_def.CopyFrom(file_graph.graph_def)
    for node in graph_def.node:
        kept = [name for name in node.input if not name.startswith("^")]  # inference needs no control edges
        del node.input[:]
        node.input.extend(kept)
    graph_def = _needed_by(graph_def, output_op, path, file_graph.output_name)
    nodes = {node.name: node for node in graph_def.node}
    input_op = _node_of(file_graph.input_name)
    if input_op not in nodes:
        raise fail("model %s: its output %s does not depend on the input %s; expected --input_name naming the "
                   "image input" % (path, file_graph.output_name, file_graph.input_name))
    _einsums_as_matmuls(graph_def, nodes)
    for node in graph_def.node:
        if node.op in _OPAQUE_OPS:
            raise fail("model %s holds op %s of type %s (a function call or control flow) that tfquant cannot "
                       "rewrite; expected a model of plain ops (no tf.while_loop / tf.cond inside)"
                       % (path, node.name, node.op))
        if node.op in _REFUSED_WEIGHT_OPS and any(
                _is_float_const(_strip_identities(nodes, name)) for name in node.input):
            raise fail("model %s holds op %s of type %s whose weight tfquant cannot quantize; expected Conv2D, "
                       "DepthwiseConv2dNative, MatMul or BatchMatMulV2 layers, or an Einsum of the data by a 2-D "
                       "weight on its last axis ('btc,cd->btd')" % (path, node.name, node.op))
    variables = dict(file_graph.variables) if file_graph.variables is not None else None
    reshaped = _fold_weight_reshapes(graph_def, nodes, variables)
    if reshaped:
        graph_def = _needed_by(graph_def, output_op, path, file_graph.output_name)
        nodes = {node.name: node for node in graph_def.node}
    if variables is not None:
        chosen = {name: trainable for name, (_, trainable) in variables.items() if name in nodes}
        names = {name: variables[name][0] for name in chosen}
    else:
        chosen = _frozen_graph_parameters(nodes)
        names = {name: variable_name(reshaped.get(name, name)) for name in chosen}
    parameters = {}
    for const_name, trainable in chosen.items():
        value = tensor_util.MakeNdarray(nodes[const_name].attr["value"].tensor)
        parameters[const_name] = Parameter(const_name, names[const_name], value, trainable,
                                           reshaped.get(const_name, ""))
    kept = [node for node in graph_def.node if node.name not in parameters and node.name != input_op]
    del graph_def.node[:]
    graph_def.node.extend(kept)
    logits, softmax = file_graph.output_name, False
    output_node = _strip_identities(nodes, file_graph.output_name)
    if output_node is not None and output_node.op == "Softmax":
        # A softmax head gives probabilities; the loss and the quantizer want the scores before it.
        logits, softmax = output_node.input[0], True
    return PreparedGraph(graph_def, file_graph.input_name, logits if ":" in logits else logits + ":0", softmax,
                         parameters, path)


def _initial_value_creator(values, scope_prefix):
    """Variable creator giving a variable named in `values` (its name below `scope_prefix`) the file's value."""
    def creator(next_creator, **kwargs):
        name = str(kwargs.get("name"))
        scope = tf1.get_default_graph().get_name_scope()
        full = "%s/%s" % (scope, name) if scope else name
        key = full[len(scope_prefix):] if full.startswith(scope_prefix) else full
        if key in values:
            kwargs["initial_value"] = values[key]
        return next_creator(**kwargs)
    return creator


def import_graph(prepared, inputs, scope_name="graph"):
    """Import the prepared graph on `inputs` (inside the caller's variable scope); returns the logits tensor.

    Variables are created (or reused) with tf.compat.v1.get_variable under their file names, their initial
    values the file's.
    """
    values = {parameter.name: parameter.value for parameter in prepared.parameters.values()}
    input_map = {prepared.input_name: inputs}
    scope = tf1.get_variable_scope().name
    with tf.variable_creator_scope(_initial_value_creator(values, scope + "/" if scope else "")):
        for parameter in prepared.parameters.values():
            variable = tf1.get_variable(parameter.name, shape=parameter.value.shape,
                                        dtype=tf.as_dtype(parameter.value.dtype),
                                        initializer=tf1.zeros_initializer(), trainable=parameter.trainable)
            input_map[parameter.const_name + ":0"] = variable.value()
    try:
        (logits,) = tf1.import_graph_def(prepared.graph_def, input_map=input_map,
                                         return_elements=[prepared.logits_name], name=scope_name)
    except Exception as exc:  # pylint: disable=broad-except  (a damaged graph fails the importer in many ways)
        raise ModelFileError("model %s: its graph cannot be imported (%s); expected a valid graph of TensorFlow %s "
                             "ops" % (prepared.path, " ".join(str(exc).split())[:200], tf.__version__),
                             path=prepared.path) from None
    return logits

