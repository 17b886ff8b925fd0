"""Activation ranges: batch min/max in training, tracked by moving averages used at evaluation.

Observers (where a range comes from) are kept apart from the quantization math in `ops`.
The moving averages live in non-trainable variables, so checkpoints save them and an evaluation graph
built separately restores them by name.
"""
import tensorflow as tf

from tfquant import ops

RANGE_COLLECTION = "tfquant_activation_ranges"
RANGE_SCOPE_SUFFIX = "act_quant"


def _range_variable(name, dtype, initial):
    return tf.compat.v1.get_variable(
        name, shape=[], dtype=dtype, initializer=tf.compat.v1.constant_initializer(initial),
        trainable=False, use_resource=True,
        collections=[tf.compat.v1.GraphKeys.GLOBAL_VARIABLES, RANGE_COLLECTION])


class ActivationRange:
    """The range variables of one quantized activation: ema_min, ema_max and ema_steps."""

    def __init__(self, scope_name):
        with tf.compat.v1.variable_scope(scope_name, reuse=tf.compat.v1.AUTO_REUSE):
            self.ema_min = _range_variable("ema_min", tf.float32, 0.0)
            self.ema_max = _range_variable("ema_max", tf.float32, 0.0)
            # Counts updates; 0 means no range has been seen yet.
            self.ema_steps = _range_variable("ema_steps", tf.int64, 0)

    @property
    def variables(self):
        """The float variables an exported model needs (the step counter is training state only)."""
        return [self.ema_min, self.ema_max]

    def update(self, batch_min, batch_max, decay):
        """Ops that fold one batch's range into the moving averages (the first batch is copied)."""
        # weight = decay once a range has been seen, 0 for the first batch: ema + weight * (old - batch).
        # value() reuses each variable's read op; every assign depends on it, so it reads the old value.
        weight = decay * tf.cast(self.ema_steps.value() > 0, tf.float32)
        new_min = batch_min + weight * (self.ema_min.value() - batch_min)
        new_max = batch_max + weight * (self.ema_max.value() - batch_max)
        # The counter's increment must wait for its read, or the first batch could see it as seen.
        with tf.control_dependencies([weight]):
            count = self.ema_steps.assign_add(1, read_value=False)
        return [self.ema_min.assign(new_min, read_value=False), self.ema_max.assign(new_max, read_value=False),
                count]

    def eval_range(self, batch_min, batch_max):
        """The moving-average range, or the batch's own when no range has been recorded yet."""
        seen = self.ema_steps.value() > 0
        # tf.where on scalars rather than tf.cond: no branch functions to build, and the batch
        # reductions it may compute are cheap next to the convolutions.
        return tf.where(seen, self.ema_min.value(), batch_min), tf.where(seen, self.ema_max.value(), batch_max)


def quantize_activation(x, bits, act_range, is_training, decay, scope_name):
    """Quantize activation x, choosing its range by mode.

    Args:
      x: float activation tensor.
      bits: 1..16.
      act_range: 'ema' or 'batch'.
      is_training: training graphs use the batch range and update the moving averages.
      decay: moving-average decay.
      scope_name: variable scope of the range variables (must be the same in train and eval graphs).
    Returns:
      (quantized tensor, ActivationRange or None when act_range is 'batch').
    """
    # Ranges take no gradient: reduce a stop_gradient view, with one axes tensor for both reductions.
    axes = tf.range(tf.rank(x)) if x.shape.rank is None else tf.constant(list(range(x.shape.rank)), tf.int32)
    frozen = tf.stop_gradient(x)
    batch_min, batch_max = tf.reduce_min(frozen, axis=axes), tf.reduce_max(frozen, axis=axes)
    if act_range == "batch":
        return ops.straight_through(x, ops.quantize_in_range(frozen, bits, batch_min, batch_max)), None
    tracker = ActivationRange(scope_name)
    if is_training:
        # The update runs whenever the quantized output is computed, so no caller can forget it.
        with tf.control_dependencies(tracker.update(batch_min, batch_max, decay)):
            quantized = ops.quantize_in_range(frozen, bits, batch_min, batch_max)
        return ops.straight_through(x, quantized), tracker
    lo, hi = tracker.eval_range(batch_min, batch_max)
    return ops.straight_through(x, ops.quantize_in_range(frozen, bits, lo, hi, clip=True)), tracker
