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
        seen = self.ema_steps.read_value() > 0
        new_min = tf.where(seen, decay * self.ema_min.read_value() + (1.0 - decay) * batch_min, batch_min)
        new_max = tf.where(seen, decay * self.ema_max.read_value() + (1.0 - decay) * batch_max, batch_max)
        return [self.ema_min.assign(new_min), self.ema_max.assign(new_max), self.ema_steps.assign_add(1)]

    def eval_range(self, batch_range_fn):
        """The moving-average range, or the batch's own when no range has been recorded yet."""
        return tf.cond(self.ema_steps.read_value() > 0,
                       lambda: (self.ema_min.read_value(), self.ema_max.read_value()),
                       batch_range_fn)


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
    def batch_range():
        return tf.reduce_min(x), tf.reduce_max(x)

    if act_range == "batch":
        lo, hi = batch_range()
        return ops.fake_quantize(x, bits, lo, hi), None
    tracker = ActivationRange(scope_name)
    if is_training:
        lo, hi = batch_range()
        # The update runs whenever the quantized output is computed, so no caller can forget it.
        with tf.control_dependencies(tracker.update(lo, hi, decay)):
            return ops.fake_quantize(x, bits, lo, hi), tracker
    lo, hi = tracker.eval_range(batch_range)
    return ops.fake_quantize(x, bits, lo, hi, clip=True), tracker
