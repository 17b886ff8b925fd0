"""Quantized tensors recomputed in the backward pass instead of kept alive from the forward pass.

A layer that reads a quantized tensor Q(x) (a convolution's input or weight) needs Q(x) again in its own
gradient (the filter gradient reads the input, the input gradient reads the weight), so TensorFlow keeps Q(x)
from the forward pass until the backward pass reaches that layer, next to x itself, which x's producer keeps
for its own gradient (a ReLU's gradient reads its output; a weight is a variable). Every quantized
activation then costs one more activation-sized tensor at the peak of a training step: ResNet-50's
quantized activations and weights were all of W4A4's extra memory over float.

`recompute_in_backward` gives the matmul-like readers of each straight-through join whose chain from x to
Q(x) is elementwise and reads only x and small per-group tensors a gradient function of their own (held by
the Python op, so their NodeDefs stay the model's): it rebuilds that chain from the same tensors (the same ops
on the same values, so bit for bit the same Q(x)) once the reader's output gradient exists, and hands the
reader's own gradient the rebuilt tensor in place of the forward one. Nothing else of the gradient changes.

The rebuilt chain costs its elementwise passes again in the backward pass: for a weight, five passes over
the weight per step whatever the batch; for an activation, four passes over it (as many as its forward
quantizer's arithmetic). Measured on ResNet-50 W4A4 (channel) at 224x224, batch 32, peak RSS: 5660 MiB
keeping everything, 5558 rebuilding the weights, 4992 rebuilding activations too (float: 4932); CPU time per
step at 96x96, batch 16: +2.9 % for the weights (less at larger images, the weights' share shrinking),
+7.1 % for both. quantize_graph therefore rebuilds nothing unless QuantConfig.recompute_quantized asks for the
weights ('weights') or both ('all'; --uql_recompute_quantized), for runs short of memory rather than of time.
"""
import tensorflow as tf

from tfquant import graph_build as build
from tfquant import kernels, match

JOIN_GRADIENT_TYPE = "TfquantStraightThrough"  # ops.straight_through's IdentityN
# Elementwise ops a quantizer's chain is made of; anything else ends the search (no recomputation).
RECOMPUTABLE_TYPES = frozenset(["Sub", "Mul", "AddV2", "Round", "Floor", "Maximum", "Minimum", "ClipByValue",
                                "RealDiv", "Switch", "Merge", kernels.QUANTIZE_TYPE])
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


class RecomputingGradient:
    """A reader's own gradient, reading its inputs `indices` rebuilt from x instead of the forward ones."""

    def __init__(self, original, indices):
        self.original = original
        self.indices = tuple(sorted(set(indices)))

    def __call__(self, op, *grads):
        anchors = [getattr(g, "values", g) for g in grads if g is not None]
        inputs = list(op.inputs)
        # Built only once the backward pass reaches this op, so the copy lives from here to its use.
        with tf.control_dependencies(anchors):
            for index in self.indices:
                chain = recomputable_chain(inputs[index])
                if chain:
                    inputs[index] = _rebuild(inputs[index], chain)
        return self.original(_ReaderWithInputs(op, inputs), *grads)


def recomputed_inputs(op):
    """The indices of `op`'s inputs its gradient rebuilds (empty when it keeps them all)."""
    function = build.current_gradient_function(op)
    return function.indices if isinstance(function, RecomputingGradient) else ()


def _is_weight_join(join, trainable):
    """Whether the join quantizes a trainable variable's value as read (not a folded or computed tensor)."""
    return match.trace_variable(join.inputs[1], trainable) is not None


def _mark(reader, index):
    """Make `reader`'s gradient rebuild its input `index`; False where its gradient cannot be wrapped."""
    if reader.type not in READER_TYPES or build.in_control_flow(reader):
        return False
    current = build.current_gradient_function(reader)
    if isinstance(current, RecomputingGradient):
        if index in current.indices:
            return False
        build.set_gradient_function(reader, RecomputingGradient(current.original, current.indices + (index,)))
        return True
    try:
        original = build.gradient_function(reader)
    except LookupError:
        return False
    if original is None:
        return False
    build.set_gradient_function(reader, RecomputingGradient(original, [index]))
    return True


def recompute_in_backward(graph, activations=False):
    """Rebuild quantized tensors in the backward pass rather than keep them (see the module doc).

    Marks the matmul-like readers (READER_TYPES) of every recomputable straight-through join of `graph`: the
    weights' joins, and the others' too with `activations`. Call it on a training graph after quantize_graph
    and before its gradients are built; calling it again (e.g. with activations=True) adds to the marks.
    Returns:
      the number of reader inputs marked.
    """
    marked = 0
    trainable = {v.op.name for v in graph.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES)}
    for join in graph.get_operations():
        if not _is_join(join):
            continue
        if not activations and not _is_weight_join(join, trainable):
            continue
        if recomputable_chain(join.outputs[0]) is None:
            continue
        for reader in join.outputs[0].consumers():
            for index, tensor in enumerate(reader.inputs):
                if tensor is join.outputs[0]:
                    marked += _mark(reader, index)
    return marked
