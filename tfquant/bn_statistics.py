"""Batch norms of an inference graph and the statistics of their inputs, for re-estimating moving averages.

After quantized training the moving mean and variance of a batch norm are averages over steps whose weights and
ranges kept changing; the network actually deployed (weights on their final grid, activation ranges fixed) feeds
each batch norm other statistics. Re-estimation (as AIMET and the oscillation papers do) measures them again:
`inference_batch_norms` finds every fused batch norm of an evaluation graph with the variables holding its moving
statistics, `moment_sums` builds the per-channel sums of its input, `population_statistics` turns sums gathered
over batches into mean and variance. Nothing here runs a session or reads flags.
"""
import dataclasses

import numpy as np
import tensorflow as tf

from tfquant.fold import FUSED_BATCH_NORM_TYPES

tf1 = tf.compat.v1
_READ_TYPES = ("Identity", "ReadVariableOp")


@dataclasses.dataclass
class InferenceBatchNorm:
    """A fused batch norm in inference mode: its op, its input and the variables of its moving statistics."""

    op: tf.Operation
    inputs: tf.Tensor
    moving_mean: tf.Variable
    moving_variance: tf.Variable
    channel_axis: int


def _variable_of(tensor, by_op_name):
    """The variable a tensor reads (through Identity / ReadVariableOp), or None."""
    op = tensor.op
    for _ in range(4):
        if op.name in by_op_name:
            return by_op_name[op.name]
        if op.type not in _READ_TYPES or not op.inputs:
            return None
        op = op.inputs[0].op
    return None


def inference_batch_norms(graph):
    """Every fused batch norm of `graph` that uses moving statistics held in variables, in creation order
    (a topological order: a batch norm comes after every batch norm its input depends on).

    Returns:
      [InferenceBatchNorm]; a pair of statistic variables read by several batch norms is listed once.
    """
    by_op_name = {v.op.name: v for v in graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)}
    found, seen = [], set()
    for op in graph.get_operations():
        if op.type not in FUSED_BATCH_NORM_TYPES or op.get_attr("is_training"):
            continue
        mean, variance = (_variable_of(op.inputs[i], by_op_name) for i in (3, 4))
        if mean is None or variance is None or mean.op.name in seen:
            continue
        seen.add(mean.op.name)
        data_format = op.get_attr("data_format").decode()
        found.append(InferenceBatchNorm(op=op, inputs=op.inputs[0], moving_mean=mean, moving_variance=variance,
                                        channel_axis=1 if data_format.startswith("NC") else -1))
    return found


def moment_sums(batch_norm):
    """(per-channel sum, per-channel sum of squares, count per channel) of a batch norm's input, float64 ops."""
    x = tf.cast(batch_norm.inputs, tf.float64)
    rank = x.shape.rank
    axis = batch_norm.channel_axis % rank
    axes = [a for a in range(rank) if a != axis]
    count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float64)
    return tf.reduce_sum(x, axis=axes), tf.reduce_sum(tf.square(x), axis=axes), count


def population_statistics(sums, squares, count):
    """(mean, variance) per channel of every value summed, the variance with Bessel's correction, as a training
    batch norm's moving variance averages it; float32."""
    count = float(count)
    if count < 2:
        raise ValueError("count=%r is not valid; expected at least 2 values per channel" % (count,))
    mean = np.asarray(sums, np.float64) / count
    variance = np.maximum(np.asarray(squares, np.float64) / count - mean ** 2, 0.0) * count / (count - 1.0)
    return mean.astype(np.float32), variance.astype(np.float32)
