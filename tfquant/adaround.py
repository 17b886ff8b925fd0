"""AdaRound (Nagel et al., 2020): learn, per weight, whether it rounds down or up on its layer's grid.

Nearest rounding minimises each weight's own error, not the layer's output error. AdaRound keeps the grid
(the range groups and their alpha/beta, exactly those tfquant's weight quantizer computes) and chooses for
every weight between floor and floor + 1 in grid units, by minimising on unlabeled inputs x of the layer
    sum over outputs of (W x - W~ x)^2  +  reg_weight * sum(1 - |2 h(V) - 1|^beta)
with W~ = scale * clip(floor + h(V), 0, max_code) + offset, h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
the rectified sigmoid, and beta annealed from 20 to 2 after a warm start without the regulariser, which
drives every h to 0 or 1. The final code is floor + [h >= 0.5], so it differs from nearest rounding by at most
one step. The weights at each range group's minimum and maximum keep their nearest code: they define the grid
(min/max, or max|w| for the symmetric grid), and moving them would move the grid itself.

The codes then become float weights that the unchanged quantizer maps back to them (`rounded_weights`), so a
checkpoint of those weights is evaluated, exported and packed as any other. Functions build ops in the current
graph or run a session the caller gives; nothing here reads flags or prints.
"""
import dataclasses
import math

import numpy as np
import tensorflow as tf

from tfquant import ops, weight_grids

tf1 = tf.compat.v1
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Louizos et al.), as in the paper


@dataclasses.dataclass
class AdaRoundOptions:
    """The optimisation's settings (the paper's and AIMET's defaults, except the number of iterations)."""

    iterations: int = 500
    batch_size: int = 32
    learning_rate: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_start: float = 0.2
    seed: int = 0


@dataclasses.dataclass
class LayerGrid:
    """One weight tensor on its quantization grid, element by element (NumPy).

    position: (w - offset) / scale in grid units (float64); scale, offset: each element's group step and
    beta (float32); nearest: the quantizer's own codes (int64); max_code: the largest code; frozen: the
    elements that keep their nearest code (each group's extremes); group_min, group_max: each element's
    group extremes (float32).
    """

    position: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    nearest: np.ndarray
    max_code: int
    frozen: np.ndarray
    group_min: np.ndarray
    group_max: np.ndarray

    @property
    def floor(self):
        """floor(position) limited to the codes, int64."""
        return np.clip(np.floor(self.position), 0, self.max_code).astype(np.int64)

    def values(self, codes):
        """The dequantized weights of `codes`, computed as the quantizer does (float32)."""
        return (np.asarray(codes, np.float32) * self.scale + self.offset).astype(np.float32)


def group_index(shape, layout):
    """Each element's range-group number (int64 array of `shape`), numbered as GroupLayout numbers groups."""
    shape = [int(d) for d in shape]
    if layout.kind == "none":
        return np.zeros(shape, np.int64)
    if layout.kind == "split":
        return np.arange(math.prod(shape), dtype=np.int64).reshape(shape) // layout.bucket_size
    rank = len(shape)
    axes = [a % rank for a in layout.channel_axes]
    coordinates = np.indices(shape)
    return np.ravel_multi_index([coordinates[a] for a in axes], [shape[a] for a in axes]).astype(np.int64)


def check_grid(grid):
    """`grid` (a WeightGrid) if AdaRound can round on it (its codes are nearest rounding on a grid its range groups'
    extreme weights fix), else ValueError naming it."""
    if not isinstance(grid, weight_grids.WeightGrid) or not grid.set_by_extremes:
        handled = sorted(name for name, kind in weight_grids.GRIDS.items() if kind.set_by_extremes)
        raise ValueError("grid=%r is not valid for AdaRound; expected a WeightGrid of %s"
                         % (getattr(grid, "name", grid), ", ".join(handled)))
    return grid


def grid_codes(weight, bits, layout, grid):
    """(codes int32, alpha [groups], beta [groups]) of `weight` as the weight quantizer computes them.

    Ops in the current graph; `grid` the layer's WeightGrid (check_grid: min/max or symmetric).
    """
    return check_grid(grid).codes(weight, bits, layout)


def layer_grid(weight_value, codes, alpha, beta, bits, layout, grid):
    """The LayerGrid of a weight from its quantizer outputs (grid_codes run on weight_value).

    Args:
      weight_value: the float weight (NumPy).
      codes, alpha, beta: grid_codes' results for it.
      bits, layout, grid: the layer's quantization (grid: its WeightGrid).
    Returns:
      a LayerGrid.
    """
    weight_value = np.asarray(weight_value, np.float32)
    groups = group_index(weight_value.shape, layout)
    scale = (np.asarray(alpha, np.float32) * np.float32(1.0 / ops.levels(bits)))[groups]
    offset = np.asarray(beta, np.float32)[groups]
    max_code = check_grid(grid).max_code(bits)
    # Group extremes by one sort (ufunc.at is slow on millions of weights).
    order = np.argsort(groups.ravel(), kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(groups.ravel()[order]) != 0])
    ordered = weight_value.ravel()[order]
    low, high = np.minimum.reduceat(ordered, starts), np.maximum.reduceat(ordered, starts)
    group_min, group_max = low[groups], high[groups]
    frozen = (weight_value == group_min) | (weight_value == group_max)
    position = (weight_value.astype(np.float64) - offset) / scale.astype(np.float64)
    return LayerGrid(position=position, scale=scale, offset=offset, nearest=np.asarray(codes, np.int64),
                     max_code=max_code, frozen=frozen, group_min=group_min, group_max=group_max)


def rectified_sigmoid(v):
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return tf.clip_by_value(tf.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_logits(grid):
    """V with h(V) = the fractional part of each weight's position (AdaRound starts at the float weight)."""
    rest = np.clip(grid.position - np.floor(grid.position), 0.01, 0.99)
    return (-np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).astype(np.float32)


@dataclasses.dataclass
class RoundingProblem:
    """The ops of one layer's AdaRound problem (built by build_problem)."""

    inputs: tf.Tensor
    logits: tf.Variable
    beta: tf.Tensor
    reg_on: tf.Tensor
    reconstruction: tf.Tensor
    regularisation: tf.Tensor
    train_op: tf.Operation
    init_op: tf.Operation
    soft: tf.Tensor
    hard_codes: tf.Tensor
    hard_error: tf.Tensor
    float_output: tf.Tensor
    target: tf.Tensor


def _layer_output(node_def, data_index, weight_index, inputs, weight):
    """The layer op (a copy of `node_def`: same type and attributes) applied to inputs and weight."""
    graph_def = tf1.GraphDef()
    node = graph_def.node.add()
    node.CopyFrom(node_def)
    del node.input[:]
    names = ["adaround_input_%d:0" % i for i in range(2)]
    node.input.extend(names)
    mapping = {names[data_index]: inputs, names[weight_index]: weight}
    output, = tf1.import_graph_def(graph_def, input_map=mapping, return_elements=[node.name + ":0"],
                                   name="layer")
    return output


def _channel_axis(node_def):
    data_format = node_def.attr["data_format"].s.decode() if "data_format" in node_def.attr else "NHWC"
    return 1 if data_format.startswith("NC") else -1


def build_problem(node_def, data_index, weight_index, input_shape, weight_value, grid, options):
    """AdaRound's loss and Adam step for one layer, in the current graph.

    Args:
      node_def: the layer op's NodeDef (Conv2D, DepthwiseConv2dNative, MatMul, BatchMatMulV2...; 2 inputs).
      data_index, weight_index: which input of the op is the data and which the weight.
      input_shape: the data input's shape (first dimension None).
      weight_value: the float weight (the reconstruction target's).
      grid: its LayerGrid.
      options: AdaRoundOptions.
    Returns:
      a RoundingProblem.
    """
    inputs = tf1.placeholder(tf.float32, input_shape, name="adaround_inputs")
    weight = tf.constant(np.asarray(weight_value, np.float32))
    logits = tf1.Variable(initial_logits(grid), name="adaround_logits")
    beta = tf1.placeholder_with_default(np.float32(options.beta_start), [], name="beta")
    reg_on = tf1.placeholder_with_default(np.float32(0.0), [], name="regularise")
    soft = rectified_sigmoid(logits)
    # W~ = scale * (floor + h) + offset for the weights that move, scale * nearest + offset for the extremes, as
    # one multiply-add per weight. floor + 1 never passes the top code: only a group's maximum sits on it.
    movable = (~grid.frozen).astype(np.float32)
    base = np.where(grid.frozen, grid.nearest, grid.floor).astype(np.float32)
    soft_weight = tf.constant(base * grid.scale + grid.offset) + tf.constant(movable * grid.scale) * soft
    float_output = _layer_output(node_def, data_index, weight_index, inputs, weight)
    # Computed once for all the inputs and fed while optimising (it does not change); computed here otherwise.
    fed_target = tf1.placeholder_with_default(float_output, float_output.shape, name="target")
    target = tf.stop_gradient(fed_target)
    output = _layer_output(node_def, data_index, weight_index, inputs, soft_weight)
    axis = _channel_axis(node_def)
    # Summed over output channels, averaged over examples and positions (AIMET's normalisation).
    reconstruction = tf.reduce_mean(tf.reduce_sum(tf.square(output - target), axis=axis))
    hard_codes = tf1.placeholder(tf.int64, grid.nearest.shape, name="hard_codes")
    hard_weight = tf.cast(hard_codes, tf.float32) * tf.constant(grid.scale) + tf.constant(grid.offset)
    hard_output = _layer_output(node_def, data_index, weight_index, inputs, hard_weight)
    hard_error = tf.reduce_mean(tf.reduce_sum(tf.square(hard_output - target), axis=axis))
    # A 0/1 mask rather than a gather: the gather's sparse gradient turned dense costs more than the layer.
    movable_share = tf.constant(movable)
    # |2h - 1|^beta as exp(beta log(.)): Pow's gradient also differentiates the exponent, several times the cost.
    distance = tf.maximum(tf.abs(2.0 * soft - 1.0), 1e-12)
    regularisation = options.reg_weight * tf.reduce_sum(movable_share * (1.0 - tf.exp(beta * tf.math.log(distance))))
    loss = reconstruction + reg_on * regularisation
    optimizer = tf1.train.AdamOptimizer(options.learning_rate)
    train_op = optimizer.minimize(loss, var_list=[logits])
    init_op = tf1.variables_initializer([logits] + optimizer.variables())
    return RoundingProblem(inputs=inputs, logits=logits, beta=beta, reg_on=reg_on, reconstruction=reconstruction,
                           regularisation=regularisation, train_op=train_op, init_op=init_op, soft=soft,
                           hard_codes=hard_codes, hard_error=hard_error, float_output=float_output,
                           target=fed_target)


def annealed_beta(iteration, options):
    """(beta, regulariser on?) at an iteration: off during the warm start, then beta decays by a cosine."""
    start = options.warm_start * options.iterations
    if iteration < start:
        return options.beta_start, False
    progress = (iteration - start) / max(options.iterations - start, 1.0)
    return (options.beta_end + 0.5 * (options.beta_start - options.beta_end) * (1.0 + math.cos(math.pi * progress)),
            True)


def optimize(sess, problem, inputs, options):
    """Run AdaRound's iterations on random batches of `inputs` (NumPy, examples first); returns the roundings.

    Args:
      sess: a session on the problem's graph.
      problem: a RoundingProblem.
      inputs: the layer's data inputs on the calibration batches.
      options: AdaRoundOptions.
    Returns:
      the chosen codes' offsets from floor as an int64 array (0: down, 1: up), the weight's shape.
    """
    rng = np.random.default_rng(options.seed)
    sess.run(problem.init_op)
    count = len(inputs)
    targets = np.concatenate([sess.run(problem.float_output, feed_dict={problem.inputs: inputs[start:start + 256]})
                              for start in range(0, count, 256)])
    for iteration in range(options.iterations):
        beta, regularise = annealed_beta(iteration, options)
        chosen = rng.choice(count, size=min(options.batch_size, count), replace=False)
        sess.run(problem.train_op, feed_dict={problem.inputs: inputs[chosen], problem.target: targets[chosen],
                                              problem.beta: beta, problem.reg_on: 1.0 if regularise else 0.0})
    return (sess.run(problem.soft) >= 0.5).astype(np.int64)


def final_codes(grid, rounding_up):
    """The codes AdaRound chose: floor + rounding_up, on the grid; each group's extremes keep their nearest code."""
    codes = np.clip(grid.floor + rounding_up, 0, grid.max_code)
    return np.where(grid.frozen, grid.nearest, codes).astype(np.int64)


def rounded_weights(weight_value, grid, codes):
    """Float weights the unchanged quantizer rounds to `codes` on the same grid.

    Unchanged codes keep their weight; a changed one becomes its grid value, kept inside its group's
    [min, max] so the group's range (and so its grid) stays what it was.
    """
    weight_value = np.asarray(weight_value, np.float32)
    moved = np.clip(grid.values(codes), grid.group_min, grid.group_max)
    return np.where(codes == grid.nearest, weight_value, moved).astype(np.float32)


def output_error(sess, problem, inputs, codes, batch_size=256):
    """The layer's output error with hard `codes`: squared error summed over output channels, averaged over
    the examples of `inputs` and their positions (the reconstruction term of the loss)."""
    total = 0.0
    for start in range(0, len(inputs), batch_size):
        part = inputs[start:start + batch_size]
        total += float(sess.run(problem.hard_error, feed_dict={problem.inputs: part,
                                                               problem.hard_codes: codes})) * len(part)
    return total / max(len(inputs), 1)
