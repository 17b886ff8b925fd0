"""Finding candidate ops: matmul-like ops whose weight is read from a trainable variable, and activations.

Nothing here changes the graph.
"""
import dataclasses
import re
from typing import List, Optional, Tuple

import tensorflow as tf

WEIGHT_OP_TYPES = ("Conv2D", "MatMul", "BatchMatMulV2", "DepthwiseConv2dNative")
ACTIVATION_OP_TYPES = ("Relu", "Relu6", "Elu", "Selu", "Softplus", "Softsign", "Sigmoid", "Tanh", "LeakyRelu")
# Ops that take weights but that tfquant does not rewrite; they are reported so nothing is silently float.
UNSUPPORTED_WEIGHT_OP_TYPES = ("Conv3D", "Conv2DBackpropInput", "Conv3DBackpropInputV2", "BatchMatMul",
                               "BatchMatMulV3", "SparseMatMul", "Conv")
# Reads that pass a variable's value through unchanged.
_PASS_THROUGH_TYPES = ("Identity", "ReadVariableOp")
_VARIABLE_TYPES = ("VarHandleOp", "VariableV2", "Variable")
_GRADIENT_SCOPE = re.compile(r"^gradients(_\d+)?$")
_UNTOUCHABLE_TYPE = re.compile(
    r"^(Resource)?(Sparse)?Apply.*|.*Summary(V2)?$|^(SaveV2|RestoreV2|MergeV2Checkpoints|Save|Restore"
    r"|RestoreSlice|SaveSlices)$")


def is_untouchable(op):
    """True for gradient, optimizer, summary and saver ops, which tfquant never rewrites."""
    if _UNTOUCHABLE_TYPE.match(op.type):
        return True
    return any(_GRADIENT_SCOPE.match(part) for part in op.name.split("/"))


@dataclasses.dataclass
class WeightCandidate:
    """A matmul-like op and where its weight comes from.

    op: the consuming op; input_index: which input is the weight (None when none is a variable);
    variable_name: the trainable variable's name ('' when none); channel_axes: the weight's output-channel
    axes; depth: longest data-flow distance from the graph's inputs; skip_reason: why it cannot be
    quantized at all ('' when it can).
    """

    op: tf.Operation
    input_index: Optional[int]
    variable_name: str
    channel_axes: Tuple[int, ...]
    depth: int
    skip_reason: str = ""

    @property
    def weight(self):
        """The weight tensor as the op reads it."""
        return self.op.inputs[self.input_index] if self.input_index is not None else None


def trace_variable(tensor, trainable_names):
    """Name of the trainable variable `tensor` reads unchanged, or None.

    Args:
      tensor: an op input.
      trainable_names: set of trainable variables' op names.
    """
    op = tensor.op
    # A few pass-through hops at most (ReadVariableOp, Identity); a cycle is impossible in a DAG.
    for _ in range(8):
        if op.type in _VARIABLE_TYPES:
            return op.name if op.name in trainable_names else None
        if op.type not in _PASS_THROUGH_TYPES or not op.inputs:
            return None
        op = op.inputs[0].op
    return None


def _channel_axes(op, index):
    """Axes of the weight input that index the op's output channels."""
    rank = op.inputs[index].shape.rank
    if op.type == "Conv2D":
        return (3,)
    if op.type == "DepthwiseConv2dNative":
        return (2, 3)
    if op.type == "MatMul":
        transposed = op.get_attr("transpose_b" if index == 1 else "transpose_a")
        if index == 1:
            return (0,) if transposed else (1,)
        return (1,) if transposed else (0,)
    # BatchMatMulV2: y is [..., k, n] (adj_y: [..., n, k]); x is [..., m, k] (adj_x: [..., k, m]).
    adjoint = op.get_attr("adj_y" if index == 1 else "adj_x")
    if index == 1:
        return (rank - 2,) if adjoint else (rank - 1,)
    return (rank - 1,) if adjoint else (rank - 2,)


def data_flow_depths(graph):
    """Longest distance of every op from the graph's sources, by op name."""
    depths = {}
    for op in graph.get_operations():
        parents = [t.op.name for t in op.inputs] + [c.name for c in op.control_inputs]
        depths[op.name] = 1 + max((depths.get(p, 0) for p in parents), default=-1)
    return depths


def find_weight_candidates(graph, depths=None) -> List[WeightCandidate]:
    """All matmul-like ops (and unsupported weight ops) with their weight source, in data-flow order.

    Args:
      graph: a tf.Graph.
      depths: precomputed data_flow_depths(graph), optional.
    Returns:
      WeightCandidates sorted by (depth, creation order); unsupported ops carry a skip_reason.
    """
    depths = depths if depths is not None else data_flow_depths(graph)
    trainable = {v.op.name for v in graph.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES)}
    found = []
    for position, op in enumerate(graph.get_operations()):
        supported = op.type in WEIGHT_OP_TYPES
        if not (supported or op.type in UNSUPPORTED_WEIGHT_OP_TYPES) or is_untouchable(op):
            continue
        # Conv filters are always input 1; a matmul's weight may be either operand (prefer b).
        order = (1,) if op.type in ("Conv2D", "DepthwiseConv2dNative") else (1, 0)
        index, variable = None, None
        for i in order:
            if i < len(op.inputs):
                variable = trace_variable(op.inputs[i], trainable)
                if variable:
                    index = i
                    break
        if not supported:
            if variable is None:
                continue  # an unsupported op without a weight variable has nothing to report
            found.append((depths[op.name], position,
                          WeightCandidate(op, index, variable, (), depths[op.name],
                                          "unsupported op type %s" % op.type)))
            continue
        reason = ""
        axes = ()
        if variable is None:
            reason = "weight not from a trainable variable"
        elif not op.inputs[index].shape.is_fully_defined():
            reason = "weight shape %s not fully defined" % op.inputs[index].shape
        elif not op.inputs[index].dtype.is_floating:
            reason = "weight dtype %s is not floating point" % op.inputs[index].dtype.name
        else:
            axes = _channel_axes(op, index)
        found.append((depths[op.name], position,
                      WeightCandidate(op, index, variable or "", axes, depths[op.name], reason)))
    found.sort(key=lambda item: (item[0], item[1]))
    return [candidate for _, _, candidate in found]


def find_activations(graph, depths=None):
    """Activation ops (by type), excluding gradient scopes, in data-flow order."""
    depths = depths if depths is not None else data_flow_depths(graph)
    acts = [(depths[op.name], i, op) for i, op in enumerate(graph.get_operations())
            if op.type in ACTIVATION_OP_TYPES and not is_untouchable(op)]
    acts.sort(key=lambda item: (item[0], item[1]))
    return [op for _, _, op in acts]
