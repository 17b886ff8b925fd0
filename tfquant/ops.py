"""The quantization primitives: range groups (buckets), PocketFlow's min/max formula, the straight-through join,
LSQ's rounding, grids and gradient scale, and the int32 bias grid. Which grid a weight sits on is the business of
`tfquant.weight_grids`, which builds on these.

For one range group of a tensor x and k bits:
    alpha = max(x) - min(x) + 1e-10,  beta = min(x)            (both under stop_gradient)
    sc = (x - beta) / alpha;  x_hat = round((2^k - 1) * sc) / (2^k - 1);  Q(x) = alpha * x_hat + beta
The chain is computed from stop_gradient(x) and joined to x by `straight_through`, so dQ/dx = 1 (the
Round -> Identity override of `round_ste` matters only where a gradient reaches Round: LSQ's step size).

The graph evaluates the same formula with per-group constants folded so each element costs one
subtract, multiply, round, multiply and add:
    codes = round((x - beta) * ((2^k - 1) / alpha));  Q(x) = codes * (alpha * float32(1/(2^k - 1))) + beta
(a training graph's activation skips the subtract when beta is +0.0, see `minus_minimum`). No stock TensorFlow
kernel does this chain in fewer passes with the same float32 results: FakeQuantWithMinMaxVars(PerChannel) nudges
the range so that 0 is a level (another grid than this one), and on the symmetric grid of `weight_grids`, where 0
is a level, its own float32 arithmetic (floor(v + 0.5), its own scale) still differs in the last bits.
"""

import numpy as np
import tensorflow as tf

from tfquant import graph_build as build
from tfquant.config import FLOAT_BITS, check_bits
from tfquant.layout import LAYOUTS, GroupLayout  # noqa: F401  (the one layout type, re-exported)

RANGE_EPS = 1e-10


def _range_width(minimum, maximum):
    """alpha = (maximum - minimum) + 1e-10.

    The maximum() with 0 changes no value (maximum >= minimum) but stops grappler's arithmetic
    optimizer from reassociating the sum into (maximum + 1e-10) - minimum, which loses the 1e-10 to
    rounding and divides by zero for a constant group.
    """
    width = build.binary("Sub", maximum, minimum, "sub", lambda a, b: a - b)
    return build.binary("AddV2", build.binary("Maximum", width, 0.0, "Maximum", tf.maximum), RANGE_EPS, "add",
                        lambda a, b: a + b)


def levels(bits):
    return float(2 ** bits - 1)


def dequantize_scale(alpha, bits):
    """alpha / (2^k - 1) computed as alpha * float32(1 / (2^k - 1)).

    Written in the form TensorFlow's grappler arithmetic optimizer produces itself, so the graph runs
    these exact float32 operations whatever the session's rewrite options; an exported model
    reproduces them bit for bit as codes * scale + beta.
    """
    return build.binary("Mul", alpha, np.float32(1.0 / levels(bits)), "mul", lambda a, b: a * b)


def round_ste(x):
    """round(x) whose gradient is the identity (straight-through estimator)."""
    with x.graph.gradient_override_map({"Round": "Identity"}):
        return build.unary("Round", x, "Round", tf.round)


@tf.RegisterGradient("TfquantStraightThrough")
def _straight_through_grad(op, grad_quantized, grad_source):  # pylint: disable=unused-argument
    """Gradient of straight_through: the quantized output's gradient goes to the float input unchanged."""
    del op
    if grad_source is None:
        return [None, grad_quantized]
    return [None, grad_quantized + grad_source]


def straight_through(source, quantized):
    """`quantized` in the forward pass; in the backward pass its gradient flows to `source` as is.

    The quantization chain is computed from stop_gradient(source), so backpropagation costs no pass over
    the tensor at all: dQ/dx = 1, the same as differentiating through Round -> Identity and the scalar
    rescalings around it, without their elementwise gradient ops or the memory they keep alive.
    """
    with source.graph.gradient_override_map({"IdentityN": "TfquantStraightThrough"}):
        return build.identity_n([quantized, source], "IdentityN",
                                lambda tensors: tf.raw_ops.IdentityN(input=tensors))[0]


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
    return 0.0, levels(bits)


def lsq_gradient_scale(elements, q_p):
    """LSQ's gradient scale g = 1 / sqrt(N * Q_P) for a step size shared by N elements."""
    return 1.0 / np.sqrt(float(elements) * float(q_p))


def scale_gradient(x, factor):
    """x unchanged in the forward pass; its gradient multiplied by `factor` in the backward pass."""
    # The IdentityN of straight_through returns x's exact value, so the forward pass stays bit-exact.
    return straight_through(x * factor, tf.stop_gradient(x))


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
    quantized = round_ste(tf.clip_by_value(shifted / step, -q_n, q_p)) * step
    return quantized if offset is None else quantized + offset


def quantize_bias(bias, step):
    """A bias on the int32 grid an integer kernel adds: round(bias / step) * step, clipped to int32's range.

    `step` is the input's step times the weight's (a scalar or one per output channel), the scale int8
    runtimes give the bias; dQ/dbias = 1.
    """
    step = tf.cast(step, bias.dtype)
    limit = float(2 ** 31 - 1)
    codes = tf.clip_by_value(tf.round(tf.stop_gradient(bias) / step), -limit, limit)
    return straight_through(bias, codes * step)


def minus_minimum(x, minimum, skip_plus_zero=False):
    """x - minimum; with skip_plus_zero, x itself (no pass over it) whenever the scalar `minimum` is +0.0.

    x - (+0.0) is x bit for bit for every float32 x (-0.0 - +0.0 is -0.0), and +0.0 is the batch minimum of
    almost every ReLU output, so a training step saves one of the quantizer's passes over the tensor without
    changing a value. Switch/Merge rather than tf.cond: no branch functions to build, and only the taken side
    runs. Graphs that are exported keep the plain subtraction (skip_plus_zero=False).
    """
    if not skip_plus_zero:
        return build.binary("Sub", x, minimum, "sub", lambda a, b: a - b)
    to_shift, as_is = build.switch_on_plus_zero(x, minimum)
    return build.merge([build.binary("Sub", to_shift, minimum, "sub", lambda a, b: a - b), as_is])


def _codes_from_range(x, bits, alpha, beta, clip, skip_plus_zero=False):
    """round((2^k-1) * (x - beta) / alpha), as float, with the straight-through gradient."""
    # One multiply per element: (2^k-1)/alpha is a per-group value.
    scaled = build.binary("Mul", minus_minimum(x, beta, skip_plus_zero),
                          build.binary("RealDiv", levels(bits), alpha, "truediv", lambda a, b: a / b),
                          "mul", lambda a, b: a * b)
    if clip:
        # Needed only when the range does not come from x itself (moving-average activation ranges).
        scaled = tf.clip_by_value(scaled, 0.0, levels(bits))
    return round_ste(scaled)


def _dequantize(codes, bits, alpha, beta):
    scaled = build.binary("Mul", codes, dequantize_scale(alpha, bits), "mul", lambda a, b: a * b)
    return build.binary("AddV2", scaled, beta, "add", lambda a, b: a + b)


def quantize_in_range(x, bits, minimum, maximum, clip=False, skip_plus_zero=False):
    """Q(x) for a range [minimum, maximum], with no gradient handling (callers add straight_through).

    skip_plus_zero: a scalar range whose minimum is +0.0 skips the subtraction (`minus_minimum`; same values).
    """
    alpha = _range_width(minimum, maximum)
    codes = _codes_from_range(x, bits, alpha, minimum, clip, skip_plus_zero)
    return _dequantize(codes, bits, alpha, minimum)


def zero_exact_step(bits, minimum, maximum):
    """The step of quantize_zero_exact's grid: (max(maximum, 0) - min(minimum, 0)) * float32(1 / (2^k - 1)).

    Written as the product grappler turns the division by a constant into (as dequantize_scale), so a graph
    whose range is constant (the export's) computes the step the trained graph computes, bit for bit; the
    quotient is an ulp off in many layers, and with it the int32 bias grid and the FakeQuant ranges.
    """
    low = tf.minimum(minimum, 0.0)
    high = tf.maximum(tf.maximum(maximum, 0.0), low + RANGE_EPS)
    return (high - low) * np.float32(1.0 / levels(bits))


def quantize_zero_exact(x, bits, minimum, maximum):
    """Q(x) on the grid integer runtimes use: [min(minimum, 0), max(maximum, 0)] nudged so 0 is a level.

    The arithmetic of TensorFlow's FakeQuantWithMinMaxVars (which TFLite's and tf2onnx's converters turn
    into int8 scales and zero points: step (max - min) / (2^k - 1), zero point rounded to an integer
    level, values clipped to the nudged range and rounded half up), written with plain ops so that a
    float TFLite model can hold it too. No gradient handling (callers add straight_through).
    """
    top = levels(bits)
    low = tf.minimum(minimum, 0.0)
    step = zero_exact_step(bits, minimum, maximum)
    zero_point = tf.clip_by_value(tf.floor(-low / step + 0.5), 0.0, top)
    nudged_low = -zero_point * step
    nudged_high = (top - zero_point) * step
    clipped = tf.maximum(tf.minimum(x, nudged_high), nudged_low)
    return tf.floor((clipped - nudged_low) * (1.0 / step) + 0.5) * step + nudged_low


def grouped(x, layout):
    """View x as groups for reduction: returns (view, reduce_axes, restore_fn)."""
    shape = x.shape.as_list()
    if layout.kind == "none":
        return x, None, lambda y: y
    if layout.kind == "channel":
        rank = len(shape)
        axes = [a for a in range(rank) if a not in {c % rank for c in layout.channel_axes}]
        return x, axes, lambda y: y
    if layout.kind == "block":
        return _grouped_blocks(x, layout)
    size = int(np.prod(shape, dtype=np.int64))
    bucket = layout.bucket_size
    pieces = -(-size // bucket)
    pad = pieces * bucket - size
    flat = tf.reshape(x, [-1])
    if pad:
        # Padding with the last element (it belongs to the last piece) cannot change that piece's range.
        flat = tf.concat([flat, tf.fill([pad], flat[-1])], axis=0)
    view = tf.reshape(flat, [pieces, bucket])

    def restore(y):
        y = tf.reshape(y, [-1])
        if pad:
            y = y[:size]
        return tf.reshape(y, shape)

    return view, [1], restore


def _grouped_blocks(x, layout):
    """grouped() of a 'block' layout: x as [blocks, bucket_size, N] (see tfquant.layout), reduced over axis 1."""
    shape = x.shape.as_list()
    order, rows, columns = layout.block_matrix(shape)
    bucket = layout.bucket_size
    blocks = -(-rows // bucket)
    pad = blocks * bucket - rows
    matrix = tf.reshape(tf.transpose(x, order) if list(order) != sorted(order) else x, [rows, columns])
    if pad:
        # Padding with the last row (in the last block of every column) cannot change any block's range.
        matrix = tf.concat([matrix, tf.tile(matrix[-1:], [pad, 1])], axis=0)
    view = tf.reshape(matrix, [blocks, bucket, columns])
    inverse = [order.index(axis) for axis in range(len(shape))]

    def restore(y):
        y = tf.reshape(y, [blocks * bucket, columns])
        if pad:
            y = y[:rows]
        y = tf.reshape(y, [shape[axis] for axis in order])
        return tf.transpose(y, inverse) if list(order) != sorted(order) else y

    return view, [1], restore


def _group_range(view, reduce_axes):
    """Per-group (min, max) of `view`, with one axes tensor shared by both reductions."""
    keep = reduce_axes is not None
    axes = build.axes_constant(reduce_axes if keep else list(range(view.shape.rank)))
    return (build.reduce("Min", view, axes, keep, "Min", lambda v, a, k: tf.reduce_min(v, axis=a, keepdims=k)),
            build.reduce("Max", view, axes, keep, "Max", lambda v, a, k: tf.reduce_max(v, axis=a, keepdims=k)))


def quantize_weight(x, bits, layout=GroupLayout()):
    """Quantize a weight tensor of static shape in range groups described by `layout`.

    Args:
      x: float tensor with a fully defined shape.
      bits: 1..16 (32 returns x unchanged).
      layout: a GroupLayout.
    Returns:
      Q(x) with x's shape.
    """
    return quantize_weight_widths(x, [bits], layout)[bits]


def quantize_weight_widths(x, widths, layout=GroupLayout()):
    """quantize_weight(x, bits, layout) for every bits in `widths`, the groups' min/max computed once for all.

    Returns:
      {bits: Q(x) at that width}.
    """
    if all(check_bits("bits", bits) == FLOAT_BITS for bits in widths):
        return {bits: x for bits in widths}
    view, reduce_axes, restore = grouped(build.unary("StopGradient", x, "StopGradient", tf.stop_gradient), layout)
    lo, hi = _group_range(view, reduce_axes)
    return {bits: x if bits == FLOAT_BITS else straight_through(x, restore(quantize_in_range(view, bits, lo, hi)))
            for bits in widths}


def weight_codes(x, bits, layout=GroupLayout()):
    """The integer codes and per-group alpha/beta that `quantize_weight` uses.

    Args:
      x: float tensor with a fully defined shape.
      bits: 1..16.
      layout: a GroupLayout.
    Returns:
      (codes int32 with x's shape, alpha float [groups], beta float [groups]), groups numbered as in
      GroupLayout; float32 codes * (alpha * float32(1 / (2^k - 1))) + beta reproduces
      quantize_weight(x) bit for bit.
    """
    if check_bits("bits", bits) == FLOAT_BITS:
        raise ValueError("bits=32 has no integer codes; expected an integer from 1 to 16")
    view, reduce_axes, restore = grouped(tf.stop_gradient(x), layout)
    lo, hi = _group_range(view, reduce_axes)
    alpha = _range_width(lo, hi)
    codes = _codes_from_range(view, bits, alpha, lo, clip=False)
    return tf.cast(restore(codes), tf.int32), tf.reshape(alpha, [-1]), tf.reshape(lo, [-1])


def uniform_quantize(x, bits, bucket_type=None, bucket_size=256):
    """Quantize x uniformly to `bits` bits in weight-style range groups.

    Args:
      x: float tensor with a fully defined shape.
      bits: 1..16, or 32 to return x unchanged.
      bucket_type: None (one range for the whole tensor), 'channel' (one range per index of the last
        axis) or 'split' (consecutive pieces of `bucket_size` elements of the flattened tensor).
      bucket_size: elements per piece for 'split'.
    Returns:
      a tensor of x's shape.
    """
    x = tf.convert_to_tensor(x)
    if bucket_type is None:
        layout = GroupLayout()
    elif bucket_type == "channel":
        layout = GroupLayout("channel", channel_axes=(x.shape.rank - 1,))
    elif bucket_type == "split":
        layout = GroupLayout("split", bucket_size=bucket_size)
    else:
        raise ValueError("bucket_type=%r is not valid; expected None, 'channel' or 'split'" % (bucket_type,))
    return quantize_weight(x, bits, layout)
