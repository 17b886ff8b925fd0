"""Weight grids: the one owner of "which integer grid a weight sits on".

A WeightGrid builds a weight's training quantizer (its values and, for a learned grid, its variables), the
integer codes and per-range-group (alpha, beta) of the packed file, the step an integer kernel gives the weight,
and the storage of a code. Every module asks the grid of its config (`for_config`), never the config's strings:

  MinMaxGrid     PocketFlow's asymmetric grid: alpha = max - min, beta = min per range group.
  SymmetricGrid  zero point 0 on the narrow grid -(2^(k-1)-1) .. 2^(k-1)-1, step max|w| / (2^(k-1)-1).
  LsqGrid        LSQ's signed grid -2^(k-1) .. 2^(k-1)-1 with a learned step per range group.
  TernaryGrid    codes -1, 0, +1 times a per-group scale (TWN: threshold 0.7 mean|w|), 2 bits.
  BinaryGrid     sign(w) times the per-group mean |w| (XNOR-Net / IR-Net scale), 1 bit.

Every grid's forward value is codes * (alpha * float32(1/(2^k-1))) + beta, the packed file's formula, so a
packed model reloads it bit for bit; range groups come from `ops.grouped`, so any GroupLayout works with every
grid. A grid with zero point 0 expresses its signed codes in that form shifted up by Q_N. (A 'split' layout pads
its last piece with copies of its last element: harmless to a min/max range, it weighs that element a little more
in the last piece's means, as in LSQ's least-squares start and the ternary and binary scales.)
"""
import numpy as np
import tensorflow as tf

from tfquant import ops, ranges, step_search
from tfquant.config import FLOAT_BITS, WEIGHT_GRID_BITS, check_bits, weight_grid_of
from tfquant.layout import GroupLayout

tf1 = tf.compat.v1


def _group_shape(view, reduce_axes):
    """The shape of one value per range group, broadcastable against the grouped view."""
    if reduce_axes is None:
        return []
    return [1 if axis in reduce_axes else int(dim) for axis, dim in enumerate(view.shape.as_list())]


def _reduce_groups(reduce, view, reduce_axes):
    """`reduce` (tf.reduce_max, ...) of every range group of a grouped view, kept broadcastable against it."""
    keep = reduce_axes is not None
    axes = tf.constant(reduce_axes if keep else list(range(view.shape.rank)), tf.int32)
    return reduce(view, axis=axes, keepdims=keep)


def group_elements(shape, layout):
    """Elements that share one range group of `layout` in a tensor of `shape` (LSQ's N)."""
    return layout.group_elements(shape)


def _zero_point_packed(view, step, bits, q_n, q_p):
    """(unsigned codes as float, alpha, beta) of a grouped weight on the zero-point-0 grid -q_n .. q_p
    times `step`, expressed in the packed format's alpha/beta (codes shifted up by q_n)."""
    codes = tf.round(tf.clip_by_value(view / step, -q_n, q_p)) + q_n
    # maximum() changes no value (step >= MIN_STEP) but keeps grappler from folding the two constant
    # multiplications of step * (2^k-1) * float32(1/(2^k-1)) into one, which would round differently.
    alpha = tf.maximum(step * ops.levels(bits), ops.RANGE_EPS)
    beta = -q_n * ops.dequantize_scale(alpha, bits)
    return codes, alpha, beta


def _guarded_beta(alpha, bits, q_n):
    """beta = -q_n * scale, the maximum() with 0 (no value change: the scale is positive) keeping grappler from
    folding -q_n and float32(1/(2^k-1)) into one constant where nothing else reads the scale (as in the export's
    graph), which would round beta differently there than in training."""
    return -q_n * tf.maximum(ops.dequantize_scale(alpha, bits), 0.0)


def _decoded(codes, alpha, beta, bits):
    """codes * scale + beta as the packed decoder computes it. minimum() with 0 changes no value (beta <= 0) but
    hides the common factor of beta = -Q * scale, which grappler would otherwise hoist out as (codes - Q) * scale."""
    return codes * ops.dequantize_scale(alpha, bits) + tf.minimum(beta, 0.0)


# -- LSQ ---------------------------------------------------------------------------------------------------

def lsq_weight_codes(x, step, bits, layout=GroupLayout()):
    """The codes (int32 of x's shape in 0..2^k-1) and per-group alpha, beta [num_groups] that
    `lsq_quantize_weight` dequantizes, for a weight `x` and resolved positive steps [num_groups]."""
    view, reduce_axes, restore = ops.grouped(tf.stop_gradient(x), layout)
    step = tf.reshape(tf.stop_gradient(step), _group_shape(view, reduce_axes))
    codes, alpha, beta = _zero_point_packed(view, step, bits, *ops.signed_grid(bits))
    return tf.cast(restore(codes), tf.int32), tf.reshape(alpha, [-1]), tf.reshape(beta, [-1])


def lsq_quantize_weight(x, step, bits, layout=GroupLayout()):
    """A weight quantized on the signed LSQ grid with a learned step size per range group.

    The forward value is the packed file's codes * scale + beta; the backward pass is LSQ's (`ops.lsq_quantize`).
    Args:
      x: float weight with a fully defined shape.
      step: float [num_groups] step sizes (positive, gradient already scaled by LSQ's g).
      bits: 2..16.
      layout: a GroupLayout.
    Returns:
      Q(x) with x's shape.
    """
    q_n, q_p = ops.signed_grid(bits)
    view, reduce_axes, restore = ops.grouped(x, layout)
    group_step = tf.reshape(step, _group_shape(view, reduce_axes))
    learned = restore(ops.lsq_quantize(view, group_step, q_n, q_p))
    codes, alpha, beta = _zero_point_packed(tf.stop_gradient(view), tf.stop_gradient(group_step), bits, q_n, q_p)
    exact = restore(codes * ops.dequantize_scale(alpha, bits) + beta)
    return ops.straight_through(learned, exact)


def lsq_weight_initial(weight, bits, layout):
    """The initial step size of every range group of `layout`, as [num_groups]: the step minimising the
    group's squared quantization error (step_search.grouped_mse_step)."""
    return step_search.grouped_mse_step(weight, bits, layout)


def quantize_weight_lsq(weight, bits, layout, scope_name, is_training):
    """(Q(weight) on the signed LSQ grid with a trained step per range group, LearnedParameters holding
    `lsq_step` [num_groups] in scope `scope_name`); training graphs store the first step's initial steps."""
    shape = weight.shape.as_list()
    _, q_p = ops.signed_grid(bits)
    params = ranges.LearnedParameters(scope_name, [("lsq_step", [layout.num_groups(shape)])])
    grad_scale = ops.lsq_gradient_scale(group_elements(shape, layout), q_p)
    (step,), updates = params.resolve([lambda: lsq_weight_initial(weight, bits, layout)], is_training, grad_scale)
    with tf.control_dependencies(updates):
        return lsq_quantize_weight(weight, ops.positive_step(step), bits, layout), params


# -- the symmetric (zero point 0, narrow range) grid ---------------------------------------------------------

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
    # An all-zero group keeps a positive step, so its codes are 0 and no division by zero happens.
    step = tf.maximum(_reduce_groups(tf.reduce_max, tf.abs(view), reduce_axes) / q_p, ops.RANGE_EPS)
    codes, alpha, _ = _zero_point_packed(view, step, bits, q_n, q_p)
    return codes, alpha, _guarded_beta(alpha, bits, q_n), restore


def quantize_weight_symmetric(x, bits, layout=GroupLayout()):
    """A weight on the symmetric grid: zero point 0, codes -(2^(k-1)-1) .. 2^(k-1)-1 per range group.

    `x` (a float tensor of fully defined shape) at 2..16 `bits` (32: x unchanged) in range groups `layout`;
    dQ/dx = 1. Returns Q(x) with x's shape.
    """
    if check_bits("bits", bits) == FLOAT_BITS:
        return x
    codes, alpha, beta, restore = _symmetric_packed(x, bits, layout)
    return ops.straight_through(x, restore(_decoded(codes, alpha, beta, bits)))


def symmetric_weight_step(x, bits, layout=GroupLayout()):
    """The step of quantize_weight_symmetric's grid: a float32 scalar (layout 'none') or a vector with the
    product of the channel axes' sizes (layout 'channel'; other layouts have no per-channel step)."""
    if layout.kind not in ("none", "channel"):
        raise ValueError("symmetric_weight_step needs a 'none' or 'channel' layout, got %r" % layout.kind)
    _, alpha, _, _ = _symmetric_packed(x, bits, layout)
    step = ops.dequantize_scale(alpha, bits)
    return tf.reshape(step, []) if layout.kind == "none" else tf.reshape(step, [-1])


def symmetric_weight_codes(x, bits, layout=GroupLayout()):
    """(int32 codes of x's shape in 0..2^k-2, alpha [groups], beta [groups]) that `quantize_weight_symmetric`
    dequantizes; an element's signed code is its code minus 2^(k-1)-1."""
    codes, alpha, beta, restore = _symmetric_packed(x, bits, layout)
    return tf.cast(restore(codes), tf.int32), tf.reshape(alpha, [-1]), tf.reshape(beta, [-1])


# -- ternary and binary grids ----------------------------------------------------------------------------------
# TWN's threshold (Li et al. 2016): weights with |w| <= 0.7 mean|w| of their group become 0.
TERNARY_THRESHOLD = 0.7


def _ternary_packed(x, layout):
    """(codes 0, 1, 2 as float, alpha, beta, restore) of x on TWN's grid: signed code sign(w) where |w| > 0.7
    mean|w| of its range group, else 0; the group's scale is the mean |w| of the weights kept nonzero."""
    view, reduce_axes, restore = ops.grouped(tf.stop_gradient(x), layout)
    magnitude = tf.abs(view)
    threshold = TERNARY_THRESHOLD * _reduce_groups(tf.reduce_mean, magnitude, reduce_axes)
    kept = tf.cast(magnitude > threshold, tf.float32)
    count = _reduce_groups(tf.reduce_sum, kept, reduce_axes)
    scale = _reduce_groups(tf.reduce_sum, magnitude * kept, reduce_axes) / tf.maximum(count, 1.0)
    codes = tf.sign(view) * kept + 1.0
    # An all-zero group keeps a positive scale (its codes are all 1, the level 0).
    alpha = tf.maximum(scale * ops.levels(2), ops.RANGE_EPS)
    return codes, alpha, _guarded_beta(alpha, 2, 1.0), restore


def _binary_packed(x, layout):
    """(codes 0 / 1 as float, alpha, beta, restore) of x on the binary grid: sign(w) (0 counts as +) times the
    mean |w| of its range group, stored as alpha = 2 mean|w|, beta = -alpha / 2 (both levels exact)."""
    view, reduce_axes, restore = ops.grouped(tf.stop_gradient(x), layout)
    scale = _reduce_groups(tf.reduce_mean, tf.abs(view), reduce_axes)
    codes = tf.cast(view >= 0.0, tf.float32)
    alpha = tf.maximum(2.0 * scale, ops.RANGE_EPS)
    return codes, alpha, _guarded_beta(alpha, 1, 0.5), restore


# -- the grids -------------------------------------------------------------------------------------------------

class WeightGrid:
    """The integer grid of a weight: its training quantizer, codes, integer-kernel step and storage.

    Attributes:
      name: the grid's name in the config's lists.
      learned: training adds variables (the grid's step sizes), listed as the layer's range variables.
      integer_kernel_grid: codes are symmetric about zero on the narrow grid an int8 kernel stores, so an
        evaluation graph puts the biases of its layers on the int32 grid and an int8 export is exact.
      int8_reason: why an int8 export re-grids the weight ('' when it keeps the trained grid).
    """

    name = None
    learned = False
    integer_kernel_grid = False
    int8_reason = ""
    # Codes are nearest rounding on a grid that each range group's extreme weights fix (min/max, or max|w|): the
    # grid AdaRound may round otherwise on, keeping those extremes where they are (tfquant.adaround).
    set_by_extremes = False

    @property
    def bit_range(self):
        """(fewest, most) code bits the grid takes (FLOAT_BITS keeps a layer float on any grid)."""
        return WEIGHT_GRID_BITS[self.name]

    def storage_bits(self, bits):
        """Bits one code of a weight at `bits` takes in storage."""
        return bits

    def max_code(self, bits):
        """The largest unsigned code a weight at `bits` gets (2^k - 1 unless the grid uses fewer levels)."""
        return int(ops.levels(bits))

    def _packed(self, x, bits, layout):
        """(codes as float in the packed format, alpha, beta, restore): the fixed grids' one definition."""
        raise NotImplementedError

    def _checked(self, bits):
        """`bits` if this grid takes it (1..16 within bit_range), else ValueError."""
        fewest, most = self.bit_range
        if not fewest <= check_bits("bits", bits, allow_float=False) <= most:
            raise ValueError("bits=%r is not valid for the %s grid; expected %d to %d"
                             % (bits, self.name, fewest, most))
        return bits

    def quantize(self, weight, bits, layout, scope_name=None, is_training=True):
        """(Q(weight) with weight's shape, its LearnedParameters or None) at `bits` in range groups `layout`;
        `scope_name` holds a learned grid's variables (the same in training and evaluation graphs)."""
        del scope_name, is_training  # a fixed grid has no variables
        if check_bits("bits", bits) == FLOAT_BITS:
            return weight, None
        codes, alpha, beta, restore = self._packed(weight, self._checked(bits), layout)
        return ops.straight_through(weight, restore(_decoded(codes, alpha, beta, bits))), None

    def initial_widths(self, weight, widths, layout):
        """{bits: the weight's value on this grid when training starts} for every width (no variables are made:
        a learned grid uses its initial steps); what bit allocation measures the loss with."""
        return {bits: self.quantize(weight, bits, layout)[0] for bits in widths}

    def codes(self, weight, bits, layout, steps=None):
        """(int32 codes of weight's shape in 0..2^k-1, alpha [groups], beta [groups]) whose packed decoding
        codes * (alpha * float32(1/(2^k-1))) + beta is the quantizer's value bit for bit. `steps`: a learned
        grid's trained step sizes [groups] (None: its initial ones)."""
        del steps
        codes, alpha, beta, restore = self._packed(weight, self._checked(bits), layout)
        return tf.cast(restore(codes), tf.int32), tf.reshape(alpha, [-1]), tf.reshape(beta, [-1])

    def has_integer_step(self, layout):
        """Whether an integer kernel holds the weight with one step per layer or per output channel."""
        return self.integer_kernel_grid and layout.kind in ("none", "channel")

    def integer_step(self, weight, bits, layout):
        """The step an integer kernel gives the weight: a scalar or one per output channel (has_integer_step)."""
        raise ValueError("the %s grid has no integer kernel step" % self.name)


class MinMaxGrid(WeightGrid):
    """PocketFlow's asymmetric grid: alpha = max - min and beta = min per range group (tfquant.ops)."""

    name = "minmax"
    int8_reason = "asymmetric grid"
    set_by_extremes = True

    def quantize(self, weight, bits, layout, scope_name=None, is_training=True):
        return ops.quantize_weight(weight, bits, layout), None

    def initial_widths(self, weight, widths, layout):
        # The groups' min/max are computed once for every width.
        return ops.quantize_weight_widths(weight, widths, layout)

    def codes(self, weight, bits, layout, steps=None):
        return ops.weight_codes(weight, bits, layout)


class SymmetricGrid(WeightGrid):
    """Zero point 0 on the narrow grid -(2^(k-1)-1) .. 2^(k-1)-1, step max|w| / (2^(k-1)-1) per range group."""

    name = "symmetric"
    integer_kernel_grid = True
    set_by_extremes = True

    def max_code(self, bits):
        return int(ops.levels(bits)) - 1  # the narrow grid: 2 (2^(k-1) - 1)

    def _packed(self, x, bits, layout):
        return _symmetric_packed(x, bits, layout)

    def integer_step(self, weight, bits, layout):
        return symmetric_weight_step(weight, bits, layout)


class LsqGrid(WeightGrid):
    """LSQ's signed grid -2^(k-1) .. 2^(k-1)-1 with a trained step per range group, started at least squares."""

    name = "lsq"
    learned = True
    int8_reason = "asymmetric grid"

    def quantize(self, weight, bits, layout, scope_name=None, is_training=True):
        if check_bits("bits", bits) == FLOAT_BITS:
            return weight, None
        return quantize_weight_lsq(weight, bits, layout, scope_name, is_training)

    def initial_widths(self, weight, widths, layout):
        return {bits: weight if bits == FLOAT_BITS else lsq_quantize_weight(
            weight, ops.positive_step(lsq_weight_initial(weight, bits, layout)), bits, layout) for bits in widths}

    def codes(self, weight, bits, layout, steps=None):
        step = lsq_weight_initial(weight, bits, layout) if steps is None else steps
        return lsq_weight_codes(weight, ops.positive_step(step), bits, layout)


class TernaryGrid(WeightGrid):
    """Codes -1, 0, +1 times a per-group scale (TWN), 2 bits; dQ/dw = 1."""

    name = "ternary"
    int8_reason = "ternary grid"

    def max_code(self, bits):
        return 2

    def _packed(self, x, bits, layout):
        return _ternary_packed(x, layout)


class BinaryGrid(WeightGrid):
    """sign(w) times the mean |w| of its range group, 1 bit; dQ/dw = 1."""

    name = "binary"
    int8_reason = "binary grid"

    def _packed(self, x, bits, layout):
        return _binary_packed(x, layout)


GRIDS = {grid.name: grid for grid in (MinMaxGrid, SymmetricGrid, LsqGrid, TernaryGrid, BinaryGrid)}


def for_config(config):
    """The WeightGrid of a QuantConfig or of a report's config dict (older reports: the min/max grid)."""
    if isinstance(config, dict):
        name, _ = weight_grid_of(config.get("weight_range", "minmax"), config.get("weight_scheme", "asymmetric"))
    else:
        name, _ = weight_grid_of(config.weight_range, config.weight_scheme)
    if name not in GRIDS:
        raise ValueError("weight grid %r is not known; expected one of %s" % (name, ", ".join(sorted(GRIDS))))
    return GRIDS[name]()


def for_layer(layer, config):
    """The WeightGrid a report's weight LayerReport records (its `weight_grid`; else the config's, as in reports of
    an older tfquant, whose layers all sat on the config's grid)."""
    name = getattr(layer, "weight_grid", None)
    return GRIDS[name]() if name in GRIDS else for_config(config)


# -- NumPy views for exporters ---------------------------------------------------------------------------------

def compute_codes(items):
    """[(codes, alpha, beta) as NumPy] of items [(grid, float32 value, bits, layout, steps or None)], computed by
    the training graph's own ops in one session (a placeholder keeps each value out of grappler's constant
    folding, as in training)."""
    if not items:
        return []
    graph = tf.Graph()
    with graph.as_default():
        feeds, fetches = {}, []
        for grid, value, bits, layout, steps in items:
            x = tf1.placeholder(tf.float32, np.shape(value))
            feeds[x] = value
            if steps is not None:
                step = tf1.placeholder(tf.float32, np.shape(steps))
                feeds[step] = steps
                steps = step
            fetches.append(grid.codes(x, bits, layout, steps))
    config = tf1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    with tf1.Session(graph=graph, config=config) as sess:
        return sess.run(fetches, feed_dict=feeds)


def scale_zero_point(alpha, beta, bits):
    """(scale, zero point) per range group of packed (alpha, beta): value = (code - zero point) * scale, with
    scale = alpha * float32(1/(2^k-1)); the zero point -beta / scale need not be an integer (the min/max grid)."""
    scale = np.asarray(alpha, np.float32) * np.float32(1.0 / ops.levels(bits))
    return scale, -np.asarray(beta, np.float32) / scale


def integer_groups(alpha, beta, bits, codes=None):
    """Per range group, whether its grid is exactly an integer grid: an integer zero point z in 0..2^k-1 with
    code * scale + beta == (code - z) * scale in float32 for every code in `codes` (default: 0..2^k-1; a grid
    that uses fewer, as ternary's 0..2 of 2 bits, passes its own)."""
    scale, zero_point = scale_zero_point(alpha, beta, bits)
    rounded = np.round(zero_point)
    codes = np.arange(2 ** bits) if codes is None else np.asarray(codes)
    codes = codes.astype(np.float32)[:, None]
    decoded = codes * scale + np.asarray(beta, np.float32)
    shifted = (codes - rounded.astype(np.float32)) * scale
    return (zero_point == rounded) & (rounded >= 0) & (rounded <= ops.levels(bits)) & np.all(decoded == shifted, axis=0)
