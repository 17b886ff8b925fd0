"""Activation ranges: batch min/max with moving averages, or learned ranges (PACT, LSQ, LSQ+).

Observers (where a range comes from) are kept apart from the quantization math in `ops`.
The moving averages live in non-trainable variables, so checkpoints save them and an evaluation graph
built separately restores them by name.

Learned ranges are trainable variables initialised lazily: until a training step has run, the value
comes from the current tensor, and that first step stores it; an `init_steps` counter > 0 records that it
happened, so a resumed run never re-initialises. PACT's alpha starts at the top of LSQ's initial grid, at
most the batch max. An LSQ step starts at the step of least squared quantization error (step_search.least_squares_step):
of each range group of a weight, and of a sample of the first training batch for an activation (an evaluation
graph run before any training step uses LSQ's own start 2<|x|>/sqrt(Q_P) of its batch instead). LSQ's own
start has 1.7-3.8 times the squared error on the 2-4-bit weights of a trained ResNet-20.

Whether an activation is non-negative is decided by its op type alone (NON_NEGATIVE_OP_TYPES: Relu,
Relu6, Sigmoid, Softplus, whose outputs are >= 0 for every input). Those get PACT's clip to [0, alpha]
and LSQ's unsigned grid 0..2^k-1; every other activation (Elu, Selu, Tanh, LeakyRelu, Softsign, ...)
gets PACT's symmetric clip to [-alpha, alpha], or LSQ+ (the unsigned grid shifted by a learned offset
beta, initialised at the batch minimum).
"""
import numpy as np
import tensorflow as tf

from tfquant import graph_build as build
from tfquant import kernels, ops, step_search

RANGE_COLLECTION = "tfquant_activation_ranges"
RANGE_SCOPE_SUFFIX = "act_quant"
LEARNED_COLLECTION = "tfquant_learned_ranges"
# Integer training-state counters of a range (0 = never saw a training batch); not model parameters.
COUNTER_NAMES = ("ema_steps", "init_steps")
NON_NEGATIVE_OP_TYPES = ("Relu", "Relu6", "Sigmoid", "Softplus")


def _range_variable(name, dtype, initial):
    return tf.compat.v1.get_variable(
        name, shape=[], dtype=dtype, initializer=tf.compat.v1.constant_initializer(initial),
        trainable=False, use_resource=True,
        collections=[tf.compat.v1.GraphKeys.GLOBAL_VARIABLES, RANGE_COLLECTION])


class ActivationRange:
    """The range variables of one quantized activation: ema_min, ema_max and ema_steps."""

    def __init__(self, scope_name):
        built = [build.range_variable("%s/%s" % (scope_name, name), dtype, 0,
                                      [tf.compat.v1.GraphKeys.GLOBAL_VARIABLES, RANGE_COLLECTION])
                 for name, dtype in (("ema_min", tf.float32), ("ema_max", tf.float32), ("ema_steps", tf.int64))]
        if all(b is not None for b in built):
            # Every quantizer op reads each variable through its one Read op (no read per use).
            (self.ema_min, self.ema_max, self.ema_steps) = (b.variable for b in built)
            self._reads = {id(b.variable): b.read for b in built}
        else:
            with tf.compat.v1.variable_scope(scope_name, reuse=tf.compat.v1.AUTO_REUSE):
                self.ema_min = _range_variable("ema_min", tf.float32, 0.0)
                self.ema_max = _range_variable("ema_max", tf.float32, 0.0)
                # Counts updates; 0 means no range has been seen yet.
                self.ema_steps = _range_variable("ema_steps", tf.int64, 0)
            self._reads = {}
        # Evaluation graphs on the integer runtimes' grid set it: the step of the quantized tensor.
        self.step = None

    def _value(self, variable):
        """The variable's value: its one Read op where it was built here, else a new read."""
        read = self._reads.get(id(variable))
        return read if read is not None else variable.value()

    @property
    def variables(self):
        """The float variables an exported model needs (the step counter is training state only)."""
        return [self.ema_min, self.ema_max]

    def update(self, batch_min, batch_max, decay):
        """Ops that fold one batch's range into the moving averages (the first batch is copied)."""
        # weight = decay once a range has been seen, 0 for the first batch: ema + weight * (old - batch).
        # value() reuses each variable's read op; every assign depends on it, so it reads the old value.
        seen = build.binary("Greater", self._value(self.ema_steps), 0, "Greater", lambda a, b: a > b)
        weight = build.binary("Mul", decay, build.cast(seen, tf.float32), "mul", lambda a, b: a * b)
        new_min, new_max = [
            build.binary("AddV2", batch, build.binary(
                "Mul", weight, build.binary("Sub", self._value(variable), batch, "sub", lambda a, b: a - b),
                "mul", lambda a, b: a * b), "add", lambda a, b: a + b)
            for variable, batch in ((self.ema_min, batch_min), (self.ema_max, batch_max))]
        # The counter's increment must wait for its read, or the first batch could see it as seen.
        with tf.control_dependencies([weight]):
            count = build.assign(self.ema_steps, 1, add=True)
        return [build.assign(self.ema_min, new_min), build.assign(self.ema_max, new_max), count]

    def eval_range(self, batch_min, batch_max):
        """The moving-average range, or the batch's own when no range has been recorded yet."""
        seen = self._value(self.ema_steps) > 0
        # tf.where on scalars rather than tf.cond: no branch functions to build, and the batch
        # reductions it may compute are cheap next to the convolutions.
        return (tf.where(seen, self._value(self.ema_min), batch_min),
                tf.where(seen, self._value(self.ema_max), batch_max))


class LearnedParameters:
    """Trainable range parameters of one quantized tensor with lazy first-batch initialisation."""

    def __init__(self, scope_name, shapes):
        """scope_name: variable scope; shapes: ordered (name, shape) of the parameters."""
        with tf.compat.v1.variable_scope(scope_name, reuse=tf.compat.v1.AUTO_REUSE):
            self.parameters = [tf.compat.v1.get_variable(
                name, shape=shape, dtype=tf.float32, initializer=tf.compat.v1.zeros_initializer(),
                trainable=True, use_resource=True,
                collections=[tf.compat.v1.GraphKeys.GLOBAL_VARIABLES, tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES,
                             RANGE_COLLECTION, LEARNED_COLLECTION]) for name, shape in shapes]
            self.init_steps = _range_variable("init_steps", tf.int64, 0)

    @property
    def variables(self):
        """The float variables an exported model needs (the counter is training state only)."""
        return list(self.parameters)

    def resolve(self, initial_values, is_training, grad_scale=1.0, training_initial=None):
        """The parameters' values: learned once initialised, else `initial_values` from this tensor.

        Args:
          initial_values: one tensor per parameter (no gradient flows into them), or a function building
            it, computed only while no step has stored a value (a tf.cond), for a start too costly to
            recompute on every batch.
          is_training: also return the ops storing the values and counting the step.
          grad_scale: multiplies the parameters' gradients (LSQ's g).
          training_initial: replaces `initial_values` in training graphs (same forms). Activations pass
            plain tensors to evaluation graphs: the frozen graphs export builds quantize activations, and
            carry no control flow.
        Returns:
          (list of value tensors, list of update ops; empty when not training).
        """
        if is_training and training_initial is not None:
            initial_values = training_initial
        seen = self.init_steps.value() > 0
        values, updates = [], []
        for variable, initial in zip(self.parameters, initial_values):
            if callable(initial):
                initial = tf.cond(seen, lambda v=variable: tf.zeros(v.shape, v.dtype), initial)
            current = variable.value()
            values.append(tf.where(seen, ops.scale_gradient(current, grad_scale), tf.stop_gradient(initial)))
            if is_training:
                # Writes back the value this step used: the initial one on the first step, else unchanged.
                # It runs before the optimizer's update, which depends on this step's forward pass.
                updates.append(variable.assign(tf.where(seen, current, tf.stop_gradient(initial)),
                                               read_value=False))
        if is_training:
            with tf.control_dependencies([seen]):
                updates.append(self.init_steps.assign_add(1, read_value=False))
        return values, updates


# Elements of a first batch the least-squares start of an LSQ activation step is fitted on.
ACTIVATION_SAMPLE = 1 << 16


def _per_example_elements(x):
    """Elements of one example of x (LSQ's N for an activation step size), static when known."""
    if x.shape.rank is not None and x.shape[1:].is_fully_defined():
        return float(max(1, int(np.prod(x.shape[1:].as_list(), dtype=np.int64))))
    return tf.cast(tf.size(x) // tf.maximum(tf.shape(x)[0], 1), tf.float32)


def _pact(x, bits, is_training, scope_name, non_negative, decay):
    """PACT: clip to [0, alpha] ([-alpha, alpha] for signed activations), quantize with k bits."""
    params = LearnedParameters(scope_name, [("pact_alpha", [])])
    magnitude = tf.abs(tf.stop_gradient(x))
    # alpha starts where LSQ's initial step puts the top of a k-bit grid, Q_P * 2<|x|>/sqrt(Q_P), at most
    # the batch max: starting at the max (PACT's paper) leaves 2-bit ReLU outputs 3 levels spread over
    # rare outliers, and alpha's gradient (1 only where x >= alpha) brings it down slowly.
    q_p = ops.unsigned_grid(bits)[1] / (1.0 if non_negative else 2.0)
    initial = tf.minimum(tf.reduce_max(magnitude), 2.0 * np.sqrt(q_p) * tf.reduce_mean(magnitude))
    (alpha,), updates = params.resolve([initial], is_training)
    alpha = ops.positive_step(alpha)
    # minimum(alpha, .) hands ties to alpha, so alpha's gradient is 1 exactly where x >= alpha.
    if non_negative:
        lower = tf.zeros_like(alpha)
        clipped = tf.minimum(alpha, tf.nn.relu(x))
    else:
        lower = -alpha
        clipped = tf.maximum(lower, tf.minimum(alpha, x))
    if is_training and decay > 0:
        tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.REGULARIZATION_LOSSES,
                                       decay * tf.nn.l2_loss(params.parameters[0]))
    with tf.control_dependencies(updates):
        quantized = ops.quantize_in_range(tf.stop_gradient(clipped), bits, tf.stop_gradient(lower),
                                          tf.stop_gradient(alpha), skip_plus_zero=is_training)
    return ops.straight_through(clipped, quantized), params


def _sample(x, limit=ACTIVATION_SAMPLE):
    """At most about `limit` evenly strided elements of x, flattened."""
    flat = tf.reshape(x, [-1])
    # The reshape states the rank a strided slice with a computed stride may leave unknown.
    return tf.reshape(flat[::tf.maximum(1, tf.size(flat) // limit)], [-1])


def _lsq(x, bits, is_training, scope_name, non_negative):
    """LSQ (unsigned grid) for non-negative activations, LSQ+ (learned offset) for the others.

    The step starts at LSQ's 2<|x|>/sqrt(Q_P) in evaluation graphs, and in training graphs at the step of
    least squared error on a sample of the first batch (step_search.least_squares_step; LSQ's start has 1.1-5.5
    times its squared error on the 2-bit ReLU outputs of a trained ResNet-20), computed once.
    """
    q_n, q_p = ops.unsigned_grid(bits)
    frozen = tf.stop_gradient(x)
    grad_scale = 1.0 / tf.sqrt(_per_example_elements(x) * q_p)
    if non_negative:
        params = LearnedParameters(scope_name, [("lsq_step", [])])
        shifted, rest = frozen, []
    else:
        params = LearnedParameters(scope_name, [("lsq_step", []), ("lsq_offset", [])])
        lowest = tf.reduce_min(frozen)
        shifted, rest = frozen - lowest, [lowest]
    initial = [2.0 * tf.reduce_mean(tf.abs(shifted)) / np.sqrt(q_p)] + rest
    fitted = [lambda: tf.reshape(step_search.least_squares_step(_sample(shifted), q_n, q_p), [])] + rest
    values, updates = params.resolve(initial, is_training, grad_scale, training_initial=fitted)
    step = ops.positive_step(values[0])
    offset = None if non_negative else values[1]
    with tf.control_dependencies(updates):
        return ops.lsq_quantize(x, step, q_n, q_p, offset), params


def lsq_weight_initial(weight, bits, layout):
    """The initial LSQ step sizes of a weight (tfquant.weight_grids, where weight grids live)."""
    from tfquant import weight_grids  # weight_grids builds on this module's LearnedParameters
    return weight_grids.lsq_weight_initial(weight, bits, layout)


def quantize_weight_lsq(weight, bits, layout, scope_name, is_training):
    """A weight on LSQ's learned grid (tfquant.weight_grids.quantize_weight_lsq, where weight grids live)."""
    from tfquant import weight_grids  # weight_grids builds on this module's LearnedParameters
    return weight_grids.quantize_weight_lsq(weight, bits, layout, scope_name, is_training)


def _observed(x, in_range, batch_min, batch_max, act_range, is_training, decay, scope_name):
    """Q(x) on the batch range ('batch', or 'ema' in training graphs, whose moving averages it updates).

    Returns (quantized tensor or None for an 'ema' evaluation graph, the ActivationRange or None).
    """
    if act_range == "batch":
        return ops.straight_through(x, in_range(batch_min, batch_max)), None
    tracker = ActivationRange(scope_name)
    if not is_training:
        return None, tracker
    # The update runs whenever the quantized output is computed, so no caller can forget it.
    with tf.control_dependencies(tracker.update(batch_min, batch_max, decay)):
        quantized = in_range(batch_min, batch_max)
    return ops.straight_through(x, quantized), tracker


def quantize_activation(x, bits, act_range, is_training, decay, scope_name, op_type="", pact_decay=0.0,
                        zero_exact=False):
    """Quantize activation x, choosing its range by mode.

    Args:
      x: float activation tensor.
      bits: 1..16.
      act_range: 'ema', 'batch', 'pact' or 'lsq'.
      is_training: training graphs use the batch range and update the moving averages (or store the
        first batch's initial learned range).
      decay: moving-average decay.
      scope_name: variable scope of the range variables (must be the same in train and eval graphs).
      op_type: type of the op producing x; NON_NEGATIVE_OP_TYPES get unsigned learned ranges.
      pact_decay: weight of PACT's L2 decay on alpha, added to GraphKeys.REGULARIZATION_LOSSES.
      zero_exact: with 'ema' or 'batch', quantize on the integer runtimes' grid (ops.quantize_zero_exact)
        instead of PocketFlow's [min, max] grid.
    Returns:
      (quantized tensor, the range's ActivationRange / LearnedParameters, or None for 'batch').
    """
    non_negative = op_type in NON_NEGATIVE_OP_TYPES
    if act_range == "pact":
        return _pact(x, bits, is_training, scope_name, non_negative, pact_decay)
    if act_range == "lsq":
        return _lsq(x, bits, is_training, scope_name, non_negative)
    # Ranges take no gradient: reduce a stop_gradient view, with one axes tensor for both reductions.
    frozen = build.unary("StopGradient", x, "StopGradient", tf.stop_gradient)
    if is_training and not zero_exact and x.dtype == tf.float32 and kernels.available():
        # The same values in two passes over x instead of seven (tfquant.kernels); training graphs only.
        batch_min, batch_max = kernels.min_max(frozen)

        def in_range(lo, hi, clip=False):  # pylint: disable=unused-argument  (training ranges need no clip)
            return kernels.quantize_in_range(frozen, bits, lo, hi)
        return _observed(x, in_range, batch_min, batch_max, act_range, is_training, decay, scope_name)
    axes = tf.range(tf.rank(x)) if x.shape.rank is None else build.axes_constant(list(range(x.shape.rank)))
    batch_min = build.reduce("Min", frozen, axes, False, "Min", lambda v, a, k: tf.reduce_min(v, axis=a, keepdims=k))
    batch_max = build.reduce("Max", frozen, axes, False, "Max", lambda v, a, k: tf.reduce_max(v, axis=a, keepdims=k))
    if zero_exact:
        def in_range(lo, hi, clip=False):  # pylint: disable=unused-argument
            return ops.quantize_zero_exact(frozen, bits, lo, hi)  # FakeQuant always clips
    else:
        def in_range(lo, hi, clip=False):
            # Training graphs only: evaluation graphs are the ones exported, and keep plain arithmetic.
            return ops.quantize_in_range(frozen, bits, lo, hi, clip=clip, skip_plus_zero=is_training)
    quantized, tracker = _observed(x, in_range, batch_min, batch_max, act_range, is_training, decay, scope_name)
    if quantized is not None:
        return quantized, tracker
    lo, hi = tracker.eval_range(batch_min, batch_max)
    if zero_exact:
        # The step an integer runtime gives this tensor, for the int32 grid of the biases of its readers.
        tracker.step = ops.zero_exact_step(bits, lo, hi)
    return ops.straight_through(x, in_range(lo, hi, clip=True)), tracker
