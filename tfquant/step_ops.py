"""The quantization math of grids set by a step size with zero point 0, in the packed file's alpha/beta form.

LSQ (Esser et al. 2020) and LSQ+ (Bhalgat et al. 2020): a learned step per range group, signed grid
-2^(k-1) .. 2^(k-1)-1 for weights, unsigned 0 .. 2^k-1 for activations, with the published gradients; the
least-squares step that starts them. The symmetric narrow grid -(2^(k-1)-1) .. 2^(k-1)-1 that int8 kernels
store, with the int32 bias grid they add. Every weight's forward value is codes * (alpha * float32(1/(2^k-1))) +
beta, as the packed file decodes it, so a packed model reloads bit for bit. Range groups and the straight-through
join are those of `tfquant.ops`.
"""
import functools

import numpy as np
import tensorflow as tf

from tfquant import ops
from tfquant.config import FLOAT_BITS, check_bits
from tfquant.layout import GroupLayout


# -- learned step sizes (LSQ, Esser et al. 2020; LSQ+, Bhalgat et al. 2020) ----------------------------
# Smallest step size a learned range may reach: a step trained to zero or below would divide by zero.
MIN_STEP = 1e-8


def positive_step(step):
    """The step size a learned step-size variable stands for: max(|step|, MIN_STEP).

    An optimizer may push a step through zero; its magnitude keeps the grid usable and its gradient
    alive (a clamp at MIN_STEP alone would leave the layer at zero with no gradient to recover).
    """
    return tf.maximum(tf.abs(step), MIN_STEP)


def signed_grid(bits):
    """(Q_N, Q_P) of the signed grid -2^(k-1) .. 2^(k-1)-1 that LSQ weights use (k >= 2)."""
    if bits < 2:
        raise ValueError("bits=%r is not valid for a signed LSQ grid; expected at least 2 bits" % (bits,))
    return float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)


def unsigned_grid(bits):
    """(Q_N, Q_P) = (0, 2^k - 1): the grid of non-negative (or offset) LSQ activations."""
    return 0.0, ops.levels(bits)


def lsq_gradient_scale(elements, q_p):
    """LSQ's gradient scale g = 1 / sqrt(N * Q_P) for a step size shared by N elements."""
    return 1.0 / np.sqrt(float(elements) * float(q_p))


def scale_gradient(x, factor):
    """x unchanged in the forward pass; its gradient multiplied by `factor` in the backward pass."""
    # The IdentityN of straight_through returns x's exact value, so the forward pass stays bit-exact.
    return ops.straight_through(x * factor, tf.stop_gradient(x))


def lsq_quantize(x, step, q_n, q_p, offset=None):
    """LSQ fake quantization round(clip((x - offset) / step, -Q_N, Q_P)) * step + offset.

    Clipping before rounding gives exactly the published gradients: to x, 1 inside the grid and 0
    outside; to step, round(v) - v inside (v = (x - offset) / step), -Q_N below and Q_P above; to the
    offset (LSQ+), 0 inside and 1 outside. Scale step's and offset's gradients with `scale_gradient`
    before calling.

    Args:
      x: float tensor.
      step: positive step size, broadcastable to x.
      q_n, q_p: grid bounds, codes run from -q_n to q_p.
      offset: optional learned offset (LSQ+), broadcastable to x.
    Returns:
      the quantized tensor, same shape as x.
    """
    shifted = x if offset is None else x - offset
    quantized = ops.round_ste(tf.clip_by_value(shifted / step, -q_n, q_p)) * step
    return quantized if offset is None else quantized + offset


def _group_shape(view, reduce_axes):
    """The shape of one value per range group, broadcastable against the grouped view."""
    if reduce_axes is None:
        return []
    return [1 if axis in reduce_axes else int(dim) for axis, dim in enumerate(view.shape.as_list())]


@functools.lru_cache(maxsize=None)
def gaussian_step_ratio(q_n, q_p):
    """The step size, in units of the standard deviation, that minimises the mean squared error of a
    standard normal variable on the grid -q_n .. q_p (numerical integration; a search 1 % apart, then 0.01 %).

    Meant for grids of at most 8 bits: finer grids need finer integration than this, and their
    error hardly depends on the start (`grouped_mse_step` uses only the other starts there)."""
    z = np.linspace(-8.0, 8.0, 16001)
    density = np.exp(-0.5 * z * z)
    density /= density.sum()

    def best(ratios):
        errors = [np.sum(density * (np.clip(np.round(z / r), -q_n, q_p) * r - z) ** 2) for r in ratios]
        return float(ratios[int(np.argmin(errors))])

    coarse = best(np.geomspace(1e-3, 3.0, 801))  # 1 % apart
    return best(coarse * (1.0 + np.arange(-100, 101) * 1e-4))


# Starts of the least-squares step search: max|v| on the grid, then 2^(-1/4) apart down to 0.15 of it
# (refinement finds the nearest local optimum; 2^(-1/2) apart missed the best by 5-10 % at 3-4 bits).
MSE_STEP_STARTS = 12


def least_squares_step(values, q_n, q_p, axes=None, iterations=3, extra_starts=()):
    """Step sizes that nearly minimise ||round(clip(v / s, -q_n, q_p)) * s - v||^2 over `axes`.

    Several starts, each refined by `iterations` alternating steps (the codes for the step, then the
    least-squares step for those codes: neither ever increases the error), and the best kept. The starts
    put max|v| on the grid and then clip more and more of the tail (a heavy tail or a skew moves the
    optimum well inside the max); LSQ's own start 2<|v|>/sqrt(Q_P) is one of them, so the result never
    has a larger error than it.

    Args:
      values: float tensor (no gradient flows into the result).
      q_n, q_p: the grid -q_n .. q_p.
      axes: axes reduced to one step (None: all).
      iterations: refinement steps per start.
      extra_starts: further start tensors, broadcastable to the reduced shape.
    Returns:
      steps with the reduced axes kept as size 1, each at least MIN_STEP.
    """
    values = tf.stop_gradient(values)
    axes = list(range(values.shape.rank)) if axes is None else list(axes)

    def total(t):
        return tf.reduce_sum(t, axis=axes, keepdims=True)

    def codes(step):
        return tf.clip_by_value(tf.round(values / step), -q_n, q_p)

    def refine(step):
        for _ in range(iterations):
            k = codes(step)
            norm = total(k * k)
            # sum(v k) >= 0 since every code has the sign of its value; no code at all keeps the step.
            step = tf.maximum(tf.where(norm > 0, total(values * k) / tf.maximum(norm, 1.0), step), MIN_STEP)
        return step

    magnitude = tf.abs(values)
    largest = tf.reduce_max(magnitude, axis=axes, keepdims=True)
    starts = [largest / q_p * 2.0 ** (-0.25 * j) for j in range(MSE_STEP_STARTS)]
    starts.append(2.0 * tf.reduce_mean(magnitude, axis=axes, keepdims=True) / np.sqrt(q_p))
    best_step, best_error = None, None
    for start in starts + list(extra_starts):
        step = refine(tf.maximum(start, MIN_STEP))
        error = total(tf.square(codes(step) * step - values))
        if best_step is None:
            best_step, best_error = step, error
        else:
            best_step = tf.where(error < best_error, step, best_step)
            best_error = tf.minimum(error, best_error)
    return best_step


def grouped_mse_step(x, bits, layout):
    """A step size per range group of `layout` that nearly minimises ||Q(x) - x||^2 on LSQ's signed grid
    (`least_squares_step`, with the optimum of a normal distribution of the group's RMS as one more start
    up to 8 bits). On ResNet weights this is within 1 % of a 400-point search at 2 and 3 bits, where LSQ's
    own start has 1.7-2.3 times the error.

    Args:
      x: float tensor with a fully defined shape.
      bits: 2..16.
      layout: a GroupLayout.
    Returns:
      float [num_groups] step sizes, each at least MIN_STEP.
    """
    q_n, q_p = signed_grid(bits)
    view, reduce_axes, _ = ops.grouped(tf.stop_gradient(x), layout)
    axes = list(range(view.shape.rank)) if reduce_axes is None else reduce_axes
    extra = []
    if bits <= 8:
        rms = tf.sqrt(tf.reduce_mean(tf.square(view), axis=axes, keepdims=True))
        extra.append(gaussian_step_ratio(q_n, q_p) * rms)
    return tf.reshape(least_squares_step(view, q_n, q_p, axes, extra_starts=extra), [-1])


def group_elements(shape, layout):
    """Elements that share one range group of `layout` in a tensor of `shape` (LSQ's N)."""
    return layout.group_elements(shape)


def _lsq_packed(view, step, bits):
    """(unsigned codes as float, alpha, beta) of a grouped weight for a per-group step size, with
    codes * (alpha * float32(1/(2^k-1))) + beta equal to the signed LSQ grid point of every element."""
    return _zero_point_packed(view, step, bits, *signed_grid(bits))


def _zero_point_packed(view, step, bits, q_n, q_p):
    """(unsigned codes as float, alpha, beta) of a grouped weight on the zero-point-0 grid -q_n .. q_p
    times `step`, expressed in the packed format's alpha/beta (codes shifted up by q_n)."""
    codes = tf.round(tf.clip_by_value(view / step, -q_n, q_p)) + q_n
    # maximum() changes no value (step >= MIN_STEP) but keeps grappler from folding the two constant
    # multiplications of step * (2^k-1) * float32(1/(2^k-1)) into one, which would round differently.
    alpha = tf.maximum(step * ops.levels(bits), ops.RANGE_EPS)
    beta = -q_n * ops.dequantize_scale(alpha, bits)
    return codes, alpha, beta


def lsq_weight_codes(x, step, bits, layout=GroupLayout()):
    """The codes and per-group alpha/beta that `lsq_quantize_weight` dequantizes.

    Args:
      x: float weight with a fully defined shape.
      step: float [num_groups] step sizes (already resolved and positive).
      bits: 2..16.
      layout: a GroupLayout.
    Returns:
      (int32 codes of x's shape in 0..2^k-1, float alpha [num_groups], float beta [num_groups]).
    """
    view, reduce_axes, restore = ops.grouped(tf.stop_gradient(x), layout)
    step = tf.reshape(tf.stop_gradient(step), _group_shape(view, reduce_axes))
    codes, alpha, beta = _lsq_packed(view, step, bits)
    return tf.cast(restore(codes), tf.int32), tf.reshape(alpha, [-1]), tf.reshape(beta, [-1])


def lsq_quantize_weight(x, step, bits, layout=GroupLayout()):
    """A weight quantized on the signed LSQ grid with a learned step size per range group.

    The forward value is codes * (alpha * float32(1/(2^k-1))) + beta, the packed export's formula, so
    a packed model reloads it bit for bit; the backward pass is LSQ's (see `lsq_quantize`).

    Args:
      x: float weight with a fully defined shape.
      step: float [num_groups] step sizes (positive, gradient already scaled by LSQ's g).
      bits: 2..16.
      layout: a GroupLayout.
    Returns:
      Q(x) with x's shape.
    """
    q_n, q_p = signed_grid(bits)
    view, reduce_axes, restore = ops.grouped(x, layout)
    group_step = tf.reshape(step, _group_shape(view, reduce_axes))
    learned = restore(lsq_quantize(view, group_step, q_n, q_p))
    codes, alpha, beta = _lsq_packed(tf.stop_gradient(view), tf.stop_gradient(group_step), bits)
    exact = restore(codes * ops.dequantize_scale(alpha, bits) + beta)
    return ops.straight_through(learned, exact)


# -- the symmetric (zero point 0, narrow range) weight grid ----------------------------------------------

def narrow_grid(bits):
    """(Q_N, Q_P) = (2^(k-1)-1, 2^(k-1)-1): the symmetric grid int8 kernels store (k >= 2)."""
    if bits < 2:
        raise ValueError("bits=%r is not valid for the symmetric grid; expected at least 2 bits" % (bits,))
    level = float(2 ** (bits - 1) - 1)
    return level, level


def _symmetric_packed(x, bits, layout):
    """(codes as float in the packed format, alpha, beta, restore) of x on the symmetric grid, one step
    max|w| / (2^(k-1)-1) per range group."""
    q_n, q_p = narrow_grid(bits)
    view, reduce_axes, restore = ops.grouped(tf.stop_gradient(x), layout)
    keep = reduce_axes is not None
    axes = tf.constant(reduce_axes if keep else list(range(view.shape.rank)), tf.int32)
    # An all-zero group keeps a positive step, so its codes are 0 and no division by zero happens.
    step = tf.maximum(tf.reduce_max(tf.abs(view), axis=axes, keepdims=keep) / q_p, ops.RANGE_EPS)
    codes, alpha, _ = _zero_point_packed(view, step, bits, q_n, q_p)
    # maximum() changes no value (the scale is positive) but keeps grappler from folding -Q_N and
    # float32(1/(2^k-1)) into one constant when nothing else reads the scale (as in the export's graph),
    # which would round beta differently there than in training.
    beta = -q_n * tf.maximum(ops.dequantize_scale(alpha, bits), 0.0)
    return codes, alpha, beta, restore


def quantize_weight_symmetric(x, bits, layout=GroupLayout()):
    """A weight on the symmetric grid: zero point 0, codes -(2^(k-1)-1) .. 2^(k-1)-1 per range group.

    `x` (a float tensor of fully defined shape) at 2..16 `bits` (32: x unchanged) in range groups `layout`, its
    forward value computed by the packed format's formula (codes shifted by 2^(k-1)-1), so a packed model
    reloads it bit for bit; dQ/dx = 1. Returns Q(x) with x's shape.
    """
    if check_bits("bits", bits) == FLOAT_BITS:
        return x
    codes, alpha, beta, restore = _symmetric_packed(x, bits, layout)
    # beta = -Q * scale would let grappler hoist the common factor out of codes * scale + beta and compute
    # (codes - Q) * scale, which rounds differently from the packed file's decoder; minimum() with 0 changes
    # no value (beta <= 0) but hides the factor.
    return ops.straight_through(x, restore(codes * ops.dequantize_scale(alpha, bits) + tf.minimum(beta, 0.0)))


def symmetric_weight_step(x, bits, layout=GroupLayout()):
    """The step of quantize_weight_symmetric's grid: a scalar (one range group) or one per output channel.

    Args:
      x: float tensor with a fully defined shape.
      bits: 2..16.
      layout: a GroupLayout of kind 'none' or 'channel' (split pieces have no per-channel step).
    Returns:
      float32 scalar, or a vector with the product of the channel axes' sizes in their order.
    """
    if layout.kind not in ("none", "channel"):
        raise ValueError("symmetric_weight_step needs a 'none' or 'channel' layout, got %r" % layout.kind)
    _, alpha, _, _ = _symmetric_packed(x, bits, layout)
    step = ops.dequantize_scale(alpha, bits)
    return tf.reshape(step, []) if layout.kind == "none" else tf.reshape(step, [-1])


def quantize_bias(bias, step):
    """A bias on the int32 grid an integer kernel adds: round(bias / step) * step, clipped to int32's range.

    `step` is the input's step times the weight's (a scalar or one per output channel), the scale int8
    runtimes give the bias; dQ/dbias = 1.
    """
    step = tf.cast(step, bias.dtype)
    limit = float(2 ** 31 - 1)
    codes = tf.clip_by_value(tf.round(tf.stop_gradient(bias) / step), -limit, limit)
    return ops.straight_through(bias, codes * step)


def symmetric_weight_codes(x, bits, layout=GroupLayout()):
    """The packed codes and per-group alpha/beta that `quantize_weight_symmetric` dequantizes, for a float
    tensor `x` of fully defined shape at 2..16 `bits` in range groups `layout`: (int32 codes of x's shape in
    0..2^k-2, float alpha [groups], float beta [groups]). An element's signed code is its code minus 2^(k-1)-1.
    """
    codes, alpha, beta, restore = _symmetric_packed(x, bits, layout)
    return tf.cast(restore(codes), tf.int32), tf.reshape(alpha, [-1]), tf.reshape(beta, [-1])
