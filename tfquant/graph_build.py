"""Cheap construction of the quantizers' graph ops: the one place besides `rewrite.reroute_input` that uses the
graph's private construction API.

A quantizer is a few dozen small ops, and a rewrite of a deep network adds thousands of them; building each
through TensorFlow's public op functions costs about three times what the graph itself needs (argument
conversion, op-definition lookup, dispatch layers), and a Python number operand adds a Const op per use.
The helpers here create the very same ops (same type, attributes, name, control dependencies, device and
gradient-override attributes, since they go through `Graph._create_op_internal`, which applies the graph's
contexts) directly, share one Const per (graph, dtype, value), and build a resource variable's four ops
without the public constructor's extra VarIsInitializedOp.

Every helper falls back to the public function it replaces where the fast path would not create the same
thing: eager tensors, function graphs, control-flow contexts (for shared constants), operands that are not
graph tensors of the default graph, or Python numbers whose conversion would differ.
"""
import weakref

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, variable_pb2

tf1 = tf.compat.v1
# Per graph: {(dtype enum, value bytes, shape): shared Const tensor}.
_CONSTANTS = weakref.WeakKeyDictionary()
# Per graph: {variable name: ResourceVariable} made by `range_variable` (reused, as get_variable's AUTO_REUSE).
_VARIABLES = weakref.WeakKeyDictionary()
SHARED_SCOPE = "tfquant_constants"


def _type_attr(dtype):
    return attr_value_pb2.AttrValue(type=dtype.as_datatype_enum)


def _is_graph_tensor(value, graph):
    """Whether `value` is a symbolic tensor of `graph`, built outside any function graph."""
    # An eager tensor has no graph (its .graph raises): getattr's default covers it.
    return isinstance(value, tf.Tensor) and getattr(value, "graph", None) is graph


def _fast_graph():
    """The default graph when the fast path applies to it (graph mode, not a function graph), else None."""
    if tf.executing_eagerly():
        return None
    graph = tf1.get_default_graph()
    return None if getattr(graph, "building_function", False) else graph


def create(op_type, inputs, attrs, name, graph):
    """Create one op of `graph` exactly as the public function would (contexts applied); returns the op."""
    return graph._create_op_internal(op_type, list(inputs), attrs=attrs, name=name)  # pylint: disable=protected-access


def constant(value, dtype, graph):
    """A Const of `value` (a Python/NumPy number or array) as `dtype`, shared by every reader in `graph`.

    Created outside any name scope, control dependency and colocation, so its readers can be anywhere. In a
    control-flow context (a tf.cond branch, a while loop) a fresh tf.constant is made as before.
    """
    if graph._get_control_flow_context() is not None:  # pylint: disable=protected-access
        return tf.constant(value, dtype)
    array = np.asarray(value, dtype.as_numpy_dtype)
    key = (dtype.as_datatype_enum, array.tobytes(), array.shape)
    cache = _CONSTANTS.setdefault(graph, {})
    tensor = cache.get(key)
    if tensor is None:
        with graph.name_scope(None), graph.name_scope(SHARED_SCOPE), graph.control_dependencies(None), \
                graph.colocate_with(None, ignore_existing=True):
            tensor = tf.constant(array, dtype)
        cache[key] = tensor
    return tensor


def _operand(value, other, graph):
    """`value` as a tensor of `graph`: itself, or a shared constant of `other`'s dtype for a Python number.

    None when the public function's conversion could differ (arrays, NumPy scalars of another dtype, ...).
    """
    if _is_graph_tensor(value, graph):
        return value
    if not _is_graph_tensor(other, graph):
        return None
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float)) or (isinstance(value, np.generic) and value.dtype == other.dtype.as_numpy_dtype):
        if not other.dtype.is_floating and isinstance(value, float):
            return None
        return constant(value, other.dtype, graph)
    return None


def binary(op_type, x, y, name, fallback):
    """op_type(x, y) named `name` (e.g. 'Sub', 'sub'); `fallback(x, y)` builds it where the fast path does not apply.

    A Python number operand becomes a shared Const of the other operand's dtype, as the public operator
    converts it; two numbers are left to `fallback` (Python arithmetic, as before).
    """
    graph = _fast_graph()
    if graph is not None:
        left, right = _operand(x, y, graph), _operand(y, x, graph)
        if left is not None and right is not None and left.dtype == right.dtype:
            return create(op_type, [left, right], {"T": _type_attr(left.dtype)}, name, graph).outputs[0]
    return fallback(x, y)


def unary(op_type, x, name, fallback):
    """op_type(x) with attribute T (Round, StopGradient, Abs, ...); `fallback(x)` where the fast path does not apply."""
    graph = _fast_graph()
    if graph is not None and _is_graph_tensor(x, graph):
        return create(op_type, [x], {"T": _type_attr(x.dtype)}, name, graph).outputs[0]
    return fallback(x)


def reduce(op_type, x, axes, keep_dims, name, fallback):
    """Min / Max of `x` over the int32 `axes` tensor; `fallback(x, axes, keep_dims)` otherwise."""
    graph = _fast_graph()
    if graph is not None and _is_graph_tensor(x, graph) and _is_graph_tensor(axes, graph) and axes.dtype == tf.int32:
        attrs = {"T": _type_attr(x.dtype), "Tidx": _type_attr(tf.int32),
                 "keep_dims": attr_value_pb2.AttrValue(b=bool(keep_dims))}
        return create(op_type, [x, axes], attrs, name, graph).outputs[0]
    return fallback(x, axes, keep_dims)


def axes_constant(axes, graph=None):
    """An int32 vector of reduction axes: shared in graph mode, else tf.constant."""
    graph = graph or _fast_graph()
    if graph is None:
        return tf.constant(axes, tf.int32)
    return constant(np.asarray(axes, np.int32), tf.int32, graph)


def identity_n(tensors, name, fallback):
    """IdentityN of `tensors` (the gradient override in force applies); `fallback(tensors)` otherwise."""
    graph = _fast_graph()
    if graph is not None and all(_is_graph_tensor(t, graph) for t in tensors):
        attrs = {"T": attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(
            type=[t.dtype.as_datatype_enum for t in tensors]))}
        return create("IdentityN", tensors, attrs, name, graph).outputs
    return fallback(tensors)


def cast(x, dtype, name="Cast"):
    """tf.cast(x, dtype) as one Cast op."""
    graph = _fast_graph()
    if graph is not None and _is_graph_tensor(x, graph) and x.dtype != dtype:
        attrs = {"SrcT": _type_attr(x.dtype), "DstT": _type_attr(dtype), "Truncate": attr_value_pb2.AttrValue(b=False)}
        return create("Cast", [x], attrs, name, graph).outputs[0]
    return tf.cast(x, dtype)


# -- resource variables -------------------------------------------------------------------------------------

class RangeVariable:
    """A resource variable made by `range_variable`, with the one read of its value every quantizer op uses."""

    def __init__(self, variable, read):
        self.variable = variable
        self.read = read


def range_variable(name, dtype, initial, collections, trainable=False):
    """A scalar-or-shaped resource variable named `name` (absolute), initialised to the constant `initial`.

    Builds the ops `tf.compat.v1.get_variable(..., use_resource=True)` builds (VarHandleOp, Initializer/Const,
    Assign, Read/ReadVariableOp, with the same names, attributes, colocation and devices; the checkpoint
    and saved graphs see the same variable) except its VarIsInitializedOp, which nothing here reads.
    Returns:
      a RangeVariable, or None where this path does not apply (eager, a function graph, a name in use
      by another op): the caller then uses get_variable.
    """
    graph = _fast_graph()
    if graph is None or graph._get_control_flow_context() is not None:  # pylint: disable=protected-access
        return None
    # A distribution strategy (mirrored or synchronised variables) or any other variable creator decides what a
    # variable is: only the public path goes through it.
    if tf.distribute.has_strategy() or getattr(graph, "_variable_creator_stack", None):
        return None
    known = _VARIABLES.setdefault(graph, {})
    if name in known:
        return known[name]
    # As ResourceVariable's init_scope: no control dependencies, the device functions in force (a parameter
    # server's placement) kept.
    with graph.name_scope(None), graph.control_dependencies(None):
        if graph.unique_name(name, mark_as_used=False) != name:
            return None
        graph.unique_name(name)  # marks the name used, as name_scope(name) does
        value = np.asarray(initial, dtype.as_numpy_dtype)
        location = attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(s=[b"loc:@" + name.encode()]))
        # As in ResourceVariable: the initial value has no device of its own, it is colocated with the handle.
        with graph.name_scope(name + "/"), graph.device(None):
            initial_value = create("Const", [], {
                "value": attr_value_pb2.AttrValue(tensor=tf.make_tensor_proto(value, dtype)),
                "dtype": _type_attr(dtype), "_class": location}, "Initializer/Const", graph).outputs[0]
        handle = create("VarHandleOp", [], {
            "shared_name": attr_value_pb2.AttrValue(s=name.encode()),
            "shape": attr_value_pb2.AttrValue(shape=tf.TensorShape(value.shape).as_proto()),
            "dtype": _type_attr(dtype),
            "debug_name": attr_value_pb2.AttrValue(s=(name + "/").encode()),
            "container": attr_value_pb2.AttrValue(s=b""),
            "allowed_devices": attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue()),
            "_class": location}, name + "/", graph).outputs[0]
        with graph.name_scope(name + "/"):
            with graph.colocate_with(None, ignore_existing=True), graph.device(handle.device):
                initializer = create("AssignVariableOp", [handle, initial_value], {
                    "dtype": _type_attr(dtype), "validate_shape": attr_value_pb2.AttrValue(b=False)}, "Assign", graph)
            with graph.device(handle.device):
                read = create("ReadVariableOp", [handle], {"dtype": _type_attr(dtype)}, "Read/ReadVariableOp",
                              graph).outputs[0]
    definition = variable_pb2.VariableDef(
        variable_name=handle.name, initial_value_name=initial_value.name, initializer_name=initializer.name,
        snapshot_name=read.name, is_resource=True, trainable=trainable)
    with graph.as_default():
        variable = tf1.Variable(variable_def=definition)
    for collection in collections:
        graph.add_to_collection(collection, variable)
    known[name] = RangeVariable(variable, read)
    return known[name]


def assign(variable, value, add=False):
    """variable.assign(value, read_value=False) (assign_add with `add`) as one op; `value` a tensor or number."""
    graph = _fast_graph()
    op_type = "AssignAddVariableOp" if add else "AssignVariableOp"
    # A distributed variable's assignment is the strategy's (aggregated across replicas): the public path.
    if graph is not None and not tf.distribute.has_strategy() and variable.handle.graph is graph and (
            _is_graph_tensor(value, graph) or isinstance(value, (int, float))):
        if not isinstance(value, tf.Tensor):
            value = constant(value, variable.dtype, graph)
        if value.dtype == variable.dtype:
            attrs = {"dtype": _type_attr(variable.dtype)}
            if not add:
                attrs["validate_shape"] = attr_value_pb2.AttrValue(b=True)
            return create(op_type, [variable.handle, value], attrs, op_type, graph)
    if add:
        return variable.assign_add(value, read_value=False)
    return variable.assign(value, read_value=False)


def switch_on_plus_zero(x, scalar):
    """Switch(x, pred=`scalar` is +0.0, by its bits): (x where it is not, x where it is); only one side runs.

    A raw Switch/Merge pair (see `merge`) rather than tf.cond: no branch functions to build.
    """
    graph = _fast_graph()
    if (graph is None or graph._get_control_flow_context() is not None  # pylint: disable=protected-access
            or not (_is_graph_tensor(x, graph) and _is_graph_tensor(scalar, graph))):
        is_plus_zero = tf.equal(tf.bitcast(scalar, tf.int32), 0)
        return tuple(tf.raw_ops.Switch(data=x, pred=is_plus_zero))
    bits = create("Bitcast", [scalar], {"T": _type_attr(scalar.dtype), "type": _type_attr(tf.int32)}, "Bitcast",
                  graph).outputs[0]
    is_plus_zero = create("Equal", [bits, constant(0, tf.int32, graph)], {"T": _type_attr(tf.int32)}, "Equal",
                          graph).outputs[0]
    switch = create("Switch", [x, is_plus_zero], {"T": _type_attr(x.dtype)}, "Switch", graph)
    return switch.outputs[0], switch.outputs[1]


def merge(tensors):
    """The one live tensor of `tensors` (the sides of a `switch_on_plus_zero`), as tf.raw_ops.Merge."""
    graph = _fast_graph()
    if (graph is None or graph._get_control_flow_context() is not None  # pylint: disable=protected-access
            or not all(_is_graph_tensor(t, graph) for t in tensors)):
        return tf.raw_ops.Merge(inputs=list(tensors))[0]
    return create("Merge", list(tensors), {"T": _type_attr(tensors[0].dtype),
                                           "N": attr_value_pb2.AttrValue(i=len(tensors))}, "Merge",
                  graph).outputs[0]



# -- backward-pass recomputation (tfquant.recompute) --------------------------------------------------------

def gradient_function(op):
    """The function tf.gradients calls for `op` (its own, its `_gradient_op_type` override's, or its type's);
    None for a non-differentiable op; LookupError if its type has none registered."""
    from tensorflow.python.framework import ops as framework_ops  # pylint: disable=import-outside-toplevel
    return framework_ops.get_gradient_function(op)


def set_gradient_function(op, function):
    """Make tf.gradients call `function(op, *output_gradients)` for `op`.

    Held by the Python op (as function graphs hold theirs), not in its NodeDef: the op's attributes stay the
    model's, and a graph saved and imported again computes the op's own gradient.
    """
    op._gradient_function = function  # pylint: disable=protected-access


def current_gradient_function(op):
    """The function set by `set_gradient_function` on `op`, or None."""
    return op._gradient_function  # pylint: disable=protected-access


def copy_op(op, inputs):
    """A new op of `op`'s type and attributes reading `inputs`, named after it in the current name scope.

    The copy has none of `op`'s control inputs (the context's control dependencies apply); it computes
    the same values from the same input values.
    """
    attrs = {key: value for key, value in op.node_def.attr.items()}
    return op.graph._create_op_internal(  # pylint: disable=protected-access
        op.type, list(inputs), dtypes=[t.dtype for t in op.outputs], attrs=attrs, name=op.name.split("/")[-1])


def in_control_flow(op):
    """Whether `op` was built inside a tf.cond / while-loop context."""
    return op._get_control_flow_context() is not None  # pylint: disable=protected-access
