"""Batch-norm folding: quantize the weight a deployed model really multiplies by, W * gamma / sigma.

After folding, a Conv2D / DepthwiseConv2dNative / MatMul that feeds a batch norm reads the folded
weight W * m, m = gamma / sqrt(moving_variance + eps) per output channel, and weight quantization (which
runs after this pass inside quantize_graph) quantizes that product. No op of the model is rebuilt:

* training graphs: the op reads Q(W m) / m (rescale_weights, after weight quantization), so its output,
  the batch norm's input, is conv(x, Q(W m)) / m. The batch norm then computes its batch statistics, its
  moving-average updates and its gradients on the float scale it was built for, and its output equals
  conv(x, Q(W m)) * sigma_moving / sigma_batch + beta - mu_batch * gamma / sigma_batch: the batch
  statistics with tf.contrib.quantize's correction factor sigma_B / sigma_moving. m carries no gradient
  on that path: gamma learns through the batch norm.
  From the global step `freeze_bn_delay` on, its readers get conv(x, Q(W m)) + beta - moving_mean * m
  instead (moving statistics, as an inference-mode batch norm; the moving averages keep being updated).
* evaluation graphs: the batch norm's readers get conv(x, Q(W m)) + (beta - moving_mean * m), the folded
  layer an inference engine runs (the batch-norm op is left without readers).

Fused batch norms (FusedBatchNorm, V2, V3) are folded in both graphs; the unfused pattern of
tf.nn.batch_normalization (x * multiplier + offset) in evaluation graphs, where its multiplier is built
from moving statistics. In a training graph the unfused multiplier depends on the layer's own batch
statistics, so folding it would create a cycle: such layers are left unfolded and named in a note.
"""
import dataclasses
from typing import List, Optional

import tensorflow as tf

from tfquant import match, rewrite

tf1 = tf.compat.v1
FUSED_BATCH_NORM_TYPES = match.FUSED_BATCH_NORM_TYPES  # a name of this module too
FOLDABLE_OP_TYPES = ("Conv2D", "DepthwiseConv2dNative", "MatMul")
FOLD_SCOPE_SUFFIX = "bn_fold"
# A multiplier below this magnitude (gamma trained to 0) is replaced by it, so W * m keeps a usable
# range and the division by m in training graphs stays finite.
MIN_MULTIPLIER = 1e-12
_ASSIGN_TYPES = ("AssignSub", "AssignSubVariableOp", "Assign", "AssignVariableOp", "AssignMovingAvg")


@dataclasses.dataclass
class FoldedLayer:
    """One folded layer: the matmul-like op, its batch norm's output op, the folding tensors, the
    tensor the layer's readers read now (its folded output; the batch norm's in training graphs), and in
    training graphs the 1 / m its quantized weight is multiplied by (rescale_weights)."""

    op: tf.Operation
    batch_norm: tf.Operation
    multiplier: tf.Tensor
    bias: tf.Tensor
    output: tf.Tensor
    weight_scale: Optional[tf.Tensor] = None


@dataclasses.dataclass
class FoldResult:
    """What fold_batch_norms did: the folded layers and notes on layers it left alone."""

    folded: List[FoldedLayer]
    notes: List[str]

    @property
    def outputs(self):
        """{matmul-like op name: the tensor its readers read now} of the folded layers."""
        return {layer.op.name: layer.output for layer in self.folded}


def _single_reader_op(tensor, types):
    """The op of one of `types` among tensor's readers (untouchable readers ignored), or None."""
    readers = [op for op in tensor.consumers() if not match.is_untouchable(op)]
    found = [op for op in readers if op.type in types]
    return found[0] if len(found) == 1 else None


def _producer(tensor):
    """The foldable op that produced `tensor` (weights read from input 1), or None."""
    op = tensor.op
    if op.type not in FOLDABLE_OP_TYPES or match.is_untouchable(op):
        return None
    if op.type == "MatMul" and op.get_attr("transpose_a"):
        return None
    return op


def _moving_statistic(graph, statistic):
    """The moving-average variable a training graph updates from a batch statistic, read as a tensor."""
    # The nets' assign_sub(m, (m - stat) * rate) and Keras' AssignMovingAvg are a few ops downstream. The walk
    # starts at this statistic's own readers: from the batch norm op it would reach the other statistic's update.
    frontier, seen = [statistic], set()
    for _ in range(4):
        following = []
        for tensors in frontier:
            for output in ([tensors] if isinstance(tensors, tf.Tensor) else tensors.outputs):
                for reader in output.consumers():
                    if reader.name in seen:
                        continue
                    seen.add(reader.name)
                    if reader.type in _ASSIGN_TYPES and reader.inputs[0].op.type in match.VARIABLE_TYPES:
                        target = reader.inputs[0].op.name
                        for variable in graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES):
                            if variable.op.name == target:
                                return _read_before_update(variable, reader)
                    following.append(reader)
        frontier = following
    return None


def _read_before_update(variable, assign):
    """The variable's value, read before `assign` (the moving-average update) writes it in the same step."""
    value = variable.read_value()
    update_index = len(assign.inputs) - 1
    with tf.control_dependencies([value]):
        ordered = tf.identity(assign.inputs[update_index])
    rewrite.reroute_input(assign, update_index, ordered)
    return value


def _weight_side(op):
    """The shape of m against op's weight: its output-channel axes (match.channel_axes) keep their size."""
    axes = match.channel_axes(op, 1)
    return [int(dim) if axis in axes else 1 for axis, dim in enumerate(op.inputs[1].shape.as_list())]


def _fold_weight(op, multiplier, weight_side):
    """Reroute op's weight to W * m (the tensor weight quantization will quantize)."""
    weight = op.inputs[1]
    with op.graph.name_scope(None), op.graph.name_scope("%s/%s" % (op.name, FOLD_SCOPE_SUFFIX)):
        folded = weight * tf.reshape(multiplier, weight_side)
    rewrite.reroute_input(op, 1, folded)


def _safe_multiplier(multiplier):
    tiny = tf.constant(MIN_MULTIPLIER, multiplier.dtype)
    return tf.where(tf.abs(multiplier) < tiny, tf.fill(tf.shape(multiplier), tiny), multiplier)


def _fold_fused(graph, op, batch_norm, is_training, freeze_step, fold_weight=True):
    """Fold one conv -> fused batch norm pair; returns a FoldedLayer or a note why not."""
    output = op.outputs[0]
    gamma, beta = batch_norm.inputs[1], batch_norm.inputs[2]
    data_format = batch_norm.get_attr("data_format")
    if batch_norm.get_attr("is_training"):
        moving_mean = _moving_statistic(graph, batch_norm.outputs[1])
        moving_variance = _moving_statistic(graph, batch_norm.outputs[2])
        if moving_mean is None or moving_variance is None:
            return "%s: batch norm %s has no moving averages to fold with" % (op.name, batch_norm.name)
    else:
        moving_mean, moving_variance = batch_norm.inputs[3], batch_norm.inputs[4]
    epsilon = batch_norm.get_attr("epsilon")
    weight_side = _weight_side(op)
    scope = "%s/%s" % (op.name, FOLD_SCOPE_SUFFIX)
    with graph.name_scope(None), graph.name_scope(scope):
        multiplier = _safe_multiplier(gamma * tf.math.rsqrt(moving_variance + epsilon))
        bias = beta - moving_mean * multiplier
    readers = list(batch_norm.outputs[0].consumers())
    if not is_training:
        if fold_weight:
            _fold_weight(op, multiplier, weight_side)
        with graph.name_scope(None), graph.name_scope(scope):
            folded = tf.nn.bias_add(output, bias, data_format="NCHW" if data_format == b"NCHW" else None)
        rewrite.reroute_consumers(batch_norm.outputs[0], folded, readers)
        return FoldedLayer(op, batch_norm, multiplier, bias, folded)
    # Training: the op reads Q(W m) / m (see rescale_weights), so the batch norm sees the float-scale output
    # of the unfolded layer: its statistics, moving-average updates and gradients are the unfolded layer's,
    # and its output carries the correction sigma_moving / sigma_batch. m is held constant there: with the
    # straight-through estimator its two uses cancel up to the rounding error, and gamma learns through
    # the batch norm. Dividing the weight instead of the conv output costs a weight-size multiply, not a
    # full activation-size one (and its gradient) per layer.
    with graph.name_scope(None), graph.name_scope(scope):
        held = tf.stop_gradient(multiplier)
        weight_scale = tf.reshape(1.0 / held, weight_side)
    if fold_weight:
        _fold_weight(op, held, weight_side)
    if freeze_step is None:
        return FoldedLayer(op, batch_norm, multiplier, bias, batch_norm.outputs[0], weight_scale)
    # From the freeze on, the readers get conv(x, Q(W m)) / m * m + beta - moving_mean * m, computed as an
    # inference-mode batch norm of the same input: the folded layer, with gamma's gradient.
    with graph.name_scope(None), graph.name_scope(scope):
        frozen = tf1.nn.fused_batch_norm(output, gamma, beta, mean=moving_mean, variance=moving_variance,
                                         epsilon=epsilon, data_format=data_format.decode(), is_training=False)[0]
        folded = tf.where(tf.greater_equal(freeze_step, 0), frozen, batch_norm.outputs[0])
    rewrite.reroute_consumers(batch_norm.outputs[0], folded, readers)
    return FoldedLayer(op, batch_norm, multiplier, bias, folded, weight_scale)


def rescale_weights(result):
    """Training graphs: make each folded op read its (quantized) folded weight times 1 / m.

    Call after weight quantization, which quantizes the folded weight W * m each op reads after
    fold_batch_norms; conv(x, Q(W m) / m) is then the unfolded layer's output the batch norm normalizes.
    Args:
      result: the FoldResult of fold_batch_norms on a training graph (eval graphs need nothing).
    """
    for layer in result.folded:
        if layer.weight_scale is None:
            continue
        graph = layer.op.graph
        with graph.name_scope(None), graph.name_scope("%s/%s" % (layer.op.name, FOLD_SCOPE_SUFFIX)):
            scaled = layer.op.inputs[1] * layer.weight_scale
        rewrite.reroute_input(layer.op, 1, scaled)


def _depends_on(tensor, op, limit=64):
    """True when `op` is among the first `limit` ops upstream of `tensor`."""
    frontier, seen = [tensor.op], set()
    while frontier and len(seen) < limit:
        current = frontier.pop()
        if current is op:
            return True
        if current.name in seen:
            continue
        seen.add(current.name)
        frontier.extend(t.op for t in current.inputs)
    return False


def _fold_unfused(graph, op, multiply, is_training, fold_weight=True):
    """Fold conv -> x * multiplier + offset (tf.nn.batch_normalization); returns a FoldedLayer or a note."""
    output = op.outputs[0]
    multiplier = multiply.inputs[1] if multiply.inputs[0] is output else multiply.inputs[0]
    if multiplier.shape.rank != 1 or _depends_on(multiplier, op):
        kind = "training-mode " if is_training else ""
        return "%s: %sunfused batch norm %s uses the layer's batch statistics; not folded" % (
            op.name, kind, multiply.name)
    weight_side = _weight_side(op)
    readers = list(multiply.outputs[0].consumers())
    if fold_weight:
        _fold_weight(op, multiplier, weight_side)
    # x * multiplier is now the layer's own output: the offset add that follows is the folded bias.
    rewrite.reroute_consumers(multiply.outputs[0], output, readers)
    return FoldedLayer(op, multiply, multiplier, None, output)


def _is_batch_norm_multiply(reader):
    """The x * multiplier Mul of tf.nn.batch_normalization: read by an Add, multiplier from Rsqrt."""
    if reader.type != "Mul":
        return False
    upstream = {t.op.type for t in reader.inputs} | {
        t.op.type for source in reader.inputs for t in source.op.inputs}
    return "Rsqrt" in upstream and any(c.type in ("Add", "AddV2") for c in reader.outputs[0].consumers())


def fold_batch_norms(graph, is_training, freeze_bn_delay=None, weights_folded=False):
    """Rewrite every foldable op -> batch norm pair of `graph` in place (see the module docstring).

    Args:
      graph: a tf.Graph in tf.compat.v1 graph mode, not yet quantized.
      is_training: the graph trains (batch statistics with the correction factor) or evaluates.
      freeze_bn_delay: training graphs switch to moving statistics from this global step on (the
        graph's global step is created if missing); None never switches.
      weights_folded: the weight variables already hold W * m (an exported model): only the batch
        norm's readers are rerouted to the folded bias.
    Returns:
      a FoldResult. For a training graph, call rescale_weights(result) once the weights are quantized.
    """
    folded, notes = [], []
    freeze_step = None
    if is_training and freeze_bn_delay is not None:
        with graph.as_default():
            step = tf1.train.get_or_create_global_step(graph)
            with graph.name_scope(None), graph.name_scope(FOLD_SCOPE_SUFFIX):
                freeze_step = tf.cast(step, tf.int64) - int(freeze_bn_delay)
    pairs = []
    for op in graph.get_operations():
        if not op.outputs or _producer(op.outputs[0]) is None:
            continue
        fused = _single_reader_op(op.outputs[0], FUSED_BATCH_NORM_TYPES)
        if fused is not None and fused.inputs[0] is op.outputs[0]:
            pairs.append((op, fused, True))
            continue
        multiply = [r for r in op.outputs[0].consumers() if _is_batch_norm_multiply(r)]
        if len(multiply) == 1:
            pairs.append((op, multiply[0], False))
    with graph.as_default():
        for op, batch_norm, fused in pairs:
            if fused:
                result = _fold_fused(graph, op, batch_norm, is_training, freeze_step, not weights_folded)
            else:
                result = _fold_unfused(graph, op, batch_norm, is_training, not weights_folded)
            (notes if isinstance(result, str) else folded).append(result)
    return FoldResult(folded, notes)
