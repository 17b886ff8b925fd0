"""Quantized tensors recomputed in the backward pass instead of kept alive from the forward pass.

A layer that reads a quantized tensor Q(x) (a convolution's input or weight) needs Q(x) again in its own
gradient (the filter gradient reads the input, the input gradient reads the weight), so TensorFlow keeps Q(x)
from the forward pass until the backward pass reaches that layer, next to x itself, which x's producer keeps
for its own gradient (a ReLU's gradient reads its output; a weight is a variable). Every quantized
activation then costs one more activation-sized tensor at the peak of a training step: ResNet-50's
quantized activations and weights were all of W4A4's extra memory over float.

`recompute_in_backward` marks the readers of each straight-through join whose chain from x to Q(x) is
elementwise and reads only x and small per-group tensors; their gradient rebuilds that chain from the same
tensors (the same ops on the same values, so bit for bit the same Q(x)) once their output gradient exists,
and hands the registered gradient of the reader the rebuilt tensor in place of the forward one. Nothing
else of the gradient changes.
"""
import tensorflow as tf

from tfquant import graph_build as build

GRADIENT_TYPE = "TfquantRecomputedInputs"
JOIN_GRADIENT_TYPE = "TfquantStraightThrough"  # ops.straight_through's IdentityN
# The gradient a marked reader had before (its type, or the override it carried).
ORIGINAL_GRADIENT_ATTR = "_tfquant_original_gradient"
# Elementwise ops a quantizer's chain is made of; anything else ends the search (no recomputation).
RECOMPUTABLE_TYPES = frozenset(["Sub", "Mul", "AddV2", "Round", "Floor", "Maximum", "Minimum", "ClipByValue",
                                "RealDiv", "Switch", "Merge"])
# Ops whose output is their input's buffer (nothing more to keep when they are kept).
ALIAS_TYPES = frozenset(["StopGradient", "Identity"])
# Readers whose gradient reads the values of their inputs. Others (Add, Mean, Pad, ...) read at most an
# input's shape, for which a rebuilt tensor would be computed in vain.
READER_TYPES = frozenset(["Conv2D", "DepthwiseConv2dNative", "Conv3D", "MatMul", "BatchMatMul", "BatchMatMulV2",
                          "BatchMatMulV3"])


def _gradient_type(op):
    try:
        return op.get_attr("_gradient_op_type").decode()
    except ValueError:
        return None


def _is_join(op):
    return op.type == "IdentityN" and len(op.inputs) == 2 and _gradient_type(op) == JOIN_GRADIENT_TYPE


def recomputable_chain(tensor):
    """The ops from x to Q(x) of the join producing `tensor`, inputs before readers; None if not recomputable.

    Recomputable: every op is elementwise of RECOMPUTABLE_TYPES, and every tensor of the quantized shape it
    reads is x or an alias of x (so the rebuilt chain keeps nothing alive that x does not).
    """
    join = tensor.op
    if not _is_join(join) or tensor.value_index != 0:
        return None
    quantized, source = join.inputs[0], join.inputs[1]
    shape = quantized.shape
    if shape.rank is None or shape.rank == 0:
        return None
    order, seen = [], set()

    def full_size(t):
        return t.shape.rank == shape.rank and t.shape.as_list() == shape.as_list()

    def visit(t):
        if t is source or (t.op.type in ALIAS_TYPES and t.op.inputs[0] is source):
            return True
        if not full_size(t):
            return True  # a per-group value: computed once in the forward pass, small
        op = t.op
        if op in seen:
            return True
        if op.type not in RECOMPUTABLE_TYPES:
            return False
        seen.add(op)
        if not all(visit(i) for i in op.inputs):
            return False
        order.append(op)
        return True

    if quantized is source or not visit(quantized):
        return None
    return order


def _rebuild(tensor, chain):
    """A copy of `chain` reading the same outside tensors; returns the copy of `tensor`'s quantized input."""
    copies = {}
    for op in chain:
        inputs = [copies[i.op].outputs[i.value_index] if i.op in copies else i for i in op.inputs]
        copies[op] = build.copy_op(op, inputs)
    quantized = tensor.op.inputs[0]
    return copies[quantized.op].outputs[quantized.value_index]


class _ReaderWithInputs:
    """`op` as a gradient function sees it, with other input tensors."""

    def __init__(self, op, inputs):
        self._op = op
        self._inputs = inputs

    @property
    def inputs(self):
        return self._inputs

    def __getattr__(self, name):
        return getattr(self._op, name)


@tf.RegisterGradient(GRADIENT_TYPE)
def _gradient_with_recomputed_inputs(op, *grads):
    """The reader's own gradient, reading each quantized input rebuilt from x instead of the forward one."""
    gradient = build.registered_gradient(op.get_attr(ORIGINAL_GRADIENT_ATTR).decode())
    anchors = [getattr(g, "values", g) for g in grads if g is not None]
    inputs = list(op.inputs)
    # Built only once the backward pass reaches this op, so the copy lives from here to its use.
    with tf.control_dependencies(anchors):
        for index, tensor in enumerate(inputs):
            chain = recomputable_chain(tensor)
            if chain:
                inputs[index] = _rebuild(tensor, chain)
    return gradient(_ReaderWithInputs(op, inputs), *grads)


def recompute_in_backward(graph):
    """Mark the readers of every recomputable straight-through join of `graph` (see the module doc).

    Returns:
      the number of readers marked.
    """
    marked = 0
    for join in graph.get_operations():
        if not _is_join(join) or recomputable_chain(join.outputs[0]) is None:
            continue
        for reader in join.outputs[0].consumers():
            original = _gradient_type(reader) or reader.type
            if reader.type not in READER_TYPES or original == GRADIENT_TYPE or build.in_control_flow(reader):
                continue
            try:
                if build.registered_gradient(original) is None:
                    continue
            except LookupError:
                continue
            build.set_string_attr(reader, ORIGINAL_GRADIENT_ATTR, original)
            build.set_string_attr(reader, "_gradient_op_type", GRADIENT_TYPE)
            marked += 1
    return marked
