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
# Ops that hold a variable (resource and reference variables), and the fused batch norms: one definition for
# matching and folding.
VARIABLE_TYPES = ("VarHandleOp", "VariableV2", "Variable")
FUSED_BATCH_NORM_TYPES = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
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
        if op.type in VARIABLE_TYPES:
            return op.name if op.name in trainable_names else None
        if op.type not in _PASS_THROUGH_TYPES or not op.inputs:
            return None
        op = op.inputs[0].op
    return None


def channel_axes(op, index):
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
            axes = channel_axes(op, index)
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


# Layer outputs and residual sums integer kernels keep in 8 bits (QuantConfig.quantize_layer_outputs).
# A weight layer's output is taken after its batch norm and bias, as converters fuse them; a residual sum
# is an Add (AddV2, AddN) of computed tensors of rank >= 2, each seen through Identity ops (a rebuilt Keras
# model's layer outputs) and neither a constant nor a variable.
_BIAS_TYPES = ("BiasAdd", "Add", "AddV2")
_RESIDUAL_TYPES = ("Add", "AddV2", "AddN")  # AddN: a Keras 3 Add layer
# Ops whose output leaves their input's grid (an average of levels is not a level): an int8 runtime
# requantizes it (TFLite's MEAN / AVERAGE_POOL_2D onto the range the converter gives their output).
_AVERAGING_TYPES = ("Mean", "AvgPool")
# Ops that only reshape: a weight layer reading one reads its input's values.
_RESHAPE_TYPES = ("Reshape", "Squeeze", "ExpandDims", "Identity")
# ... and ops whose outputs are values of their first input (zero padding: zero is a level of the grid; a
# transpose permutes them: Keras 3's Dense on a rank-3 input transposes it before its MatMul's Reshape).
_GRID_KEEPING_TYPES = _RESHAPE_TYPES + ("MaxPool", "Pad", "Transpose")
# The report names these tensors by their weight layer, '<layer op name>:input' and '<layer op name>:output'
# (':' never occurs in an op name): the same name in training, evaluation and export graphs, whose input
# ops (a dataset iterator, a placeholder) and folded outputs (a batch norm, a bias add) differ.
MODEL_INPUT_SUFFIX = ":input"
LAYER_OUTPUT_SUFFIX = ":output"


@dataclasses.dataclass
class IntegerTensor:
    """A tensor an integer runtime holds that no quantized activation covers.

    name: how the report names it ('<layer>:input', '<layer>:output', or a residual sum's op name);
    tensor: the tensor; op_type: 'Input', 'LayerOutput' or the sum's op type.
    """

    name: str
    tensor: tf.Tensor
    op_type: str


def live_readers(tensor):
    """Readers of `tensor`, except tfquant's own ops and folded batch norms (left without readers)."""
    return [op for op in tensor.consumers() if not is_untouchable(op) and not (
        op.type in FUSED_BATCH_NORM_TYPES and not any(output.consumers() for output in op.outputs))]


def _single_live_reader(tensor, types):
    readers = live_readers(tensor)
    if len(readers) == 1 and readers[0].type in types and readers[0].inputs[0] is tensor:
        return readers[0]
    return None


def layer_output(op, folded_outputs=None):
    """A weight layer's output after its batch norm and bias, as a converter fuses them.

    Args:
      op: the matmul-like op.
      folded_outputs: {op name: tensor} of layers tfquant.fold folded (their readers read that tensor).
    """
    if folded_outputs and op.name in folded_outputs:
        return folded_outputs[op.name]
    output = op.outputs[0]
    batch_norm = _single_live_reader(output, FUSED_BATCH_NORM_TYPES)
    if batch_norm is not None:
        output = batch_norm.outputs[0]
    bias = bias_reader(output)
    return bias.outputs[0] if bias is not None else output


def bias_reader(output):
    """The op adding a bias (a rank-1 tensor) to a weight layer's `output` when it is its only reader, or None."""
    readers = live_readers(output)
    if len(readers) != 1 or readers[0].type not in _BIAS_TYPES or len(readers[0].inputs) != 2:
        return None
    other = [t for t in readers[0].inputs if t is not output]
    return readers[0] if len(other) == 1 and other[0].shape.rank == 1 else None


def data_operand_index(op):
    """Index of the input of a weight op that is not its weight (the first traced to a trainable variable)."""
    if op.type in ("Conv2D", "DepthwiseConv2dNative"):
        return 0
    trainable = {v.op.name for v in op.graph.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES)}
    weight = next((i for i in (1, 0) if i < len(op.inputs) and trace_variable(op.inputs[i], trainable)), 1)
    return 1 - weight


def reachable(starts, step):
    """{name: op} of the ops reachable from the ops `starts` through `step(op)` (its neighbours), starts included."""
    seen, stack = {}, list(starts)
    while stack:
        op = stack.pop()
        if op.name not in seen:
            seen[op.name] = op
            stack.extend(step(op))
    return seen


def readers(op):
    """The ops that read an output of `op` (reachable's step downstream)."""
    return [reader for output in op.outputs for reader in output.consumers()]


def grid_source(tensor):
    """The tensor whose values `tensor` holds, walking back through reshapes, max pooling and zero padding."""
    while tensor.op.type in _GRID_KEEPING_TYPES and tensor.op.inputs:
        tensor = tensor.op.inputs[0]
    return tensor


def _averaged_input(data):
    """The output of the averaging op (Mean, AvgPool) a weight layer's data input is, through reshapes."""
    tensor = data
    while tensor is not None and tensor.op.type in _RESHAPE_TYPES and tensor.op.inputs:
        tensor = tensor.op.inputs[0]
    if tensor is not None and tensor.op.type in _AVERAGING_TYPES and tensor.dtype.is_floating:
        return tensor
    return None


def find_integer_tensors(graph, candidates, covered, folded_outputs=None):
    """The tensors besides activations an int8 model quantizes, in data-flow order of their layers.

    Model inputs read by a weight layer, averages (Mean, AvgPool) a weight layer reads, weight-layer
    outputs and residual sums, each unless every live reader is an activation in `covered` (whose own
    quantized output then carries the range).

    Args:
      graph: the graph (after batch-norm folding, before any quantizer is inserted).
      candidates: WeightCandidates of supported ops (find_weight_candidates without skip_reason).
      covered: names of the activation ops that are quantized with a stored range.
      folded_outputs: {op name: tensor} of the folded layers (tfquant.fold.FoldedLayer.output).
    Returns:
      a list of IntegerTensor, each tensor once.
    """
    def needs_range(tensor):
        readers = live_readers(tensor)
        return not readers or not all(r.type in ACTIVATION_OP_TYPES and r.name in covered for r in readers)

    computed = reachable([c.op for c in candidates], readers)
    found = []
    for candidate in candidates:
        data = candidate.op.inputs[data_operand_index(candidate.op)] if len(candidate.op.inputs) > 1 else None
        if data is not None and data.op.name not in computed and data.dtype.is_floating:
            found.append(IntegerTensor(candidate.op.name + MODEL_INPUT_SUFFIX, data, "Input"))
        average = _averaged_input(data)
        if average is not None and average.op.name in computed and needs_range(average):
            found.append(IntegerTensor(average.op.name, average, average.op.type))
        output = layer_output(candidate.op, folded_outputs)
        if needs_range(output):
            found.append(IntegerTensor(candidate.op.name + LAYER_OUTPUT_SUFFIX, output, "LayerOutput"))
    for op in graph.get_operations():
        if (op.type in _RESIDUAL_TYPES and op.name in computed and not is_untouchable(op)
                and all(t.shape.rank is not None and t.shape.rank >= 2 for t in op.inputs)
                and all(_source(t).type not in ("Const", "ReadVariableOp") + VARIABLE_TYPES for t in op.inputs)
                and needs_range(op.outputs[0])):
            found.append(IntegerTensor(op.name, op.outputs[0], op.type))
    unique = []
    for item in found:
        if all(item.tensor is not other.tensor for other in unique):
            unique.append(item)
    return unique


def _source(tensor):
    """The op that computes `tensor`, through Identity ops."""
    while tensor.op.type == "Identity" and tensor.op.inputs:
        tensor = tensor.op.inputs[0]
    return tensor.op


def integer_tensor(graph, name, folded_outputs=None):
    """The tensor a report's activation entry names (see find_integer_tensors), in `graph`.

    Call it before weights are rerouted through quantizers (a model input is told from the weight by
    tracing the weight to its variable).
    """
    for suffix in (MODEL_INPUT_SUFFIX, LAYER_OUTPUT_SUFFIX):
        if name.endswith(suffix):
            op = graph.get_operation_by_name(name[:-len(suffix)])
            if suffix == MODEL_INPUT_SUFFIX:
                return op.inputs[data_operand_index(op)]
            return layer_output(op, folded_outputs)
    return graph.get_operation_by_name(name).outputs[0]
