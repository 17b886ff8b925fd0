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

The optimisation itself runs on the layer's quadratic form (tfquant.adaround_solver): the output error is
trace(D^T G D) over the Gram matrix G of the layer's input rows, so each Adam step costs one [K, K] x [K, C]
product whatever the number of calibration examples.

The codes then become float weights that the unchanged quantizer maps back to them (`rounded_weights`), so a
checkpoint of those weights is evaluated, exported and packed as any other. Functions build ops in the current
graph or run a session the caller gives; nothing here reads flags or prints.
"""
import dataclasses
import math
from typing import Optional

import numpy as np

from tfquant import ops, weight_grids
from tfquant.adaround_solver import GAMMA, ZETA


@dataclasses.dataclass
class AdaRoundOptions:
    """The optimisation's settings (the paper's and AIMET's defaults, except the number of iterations)."""

    iterations: int = 500
    # Input rows of a layer per weight of one output channel (K): when a layer has more than K times this many
    # (a conv's early layers have many positions per example), a random subset of them. None: all.
    rows_per_input: Optional[int] = None
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


def initial_logits(grid):
    """V with h(V) = the fractional part of each weight's position (AdaRound starts at the float weight)."""
    rest = np.clip(grid.position - np.floor(grid.position), 0.01, 0.99)
    return (-np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).astype(np.float32)


def annealed_beta(iteration, options):
    """(beta, regulariser on?) at an iteration: off during the warm start, then beta decays by a cosine."""
    start = options.warm_start * options.iterations
    if iteration < start:
        return options.beta_start, False
    progress = (iteration - start) / max(options.iterations - start, 1.0)
    return (options.beta_end + 0.5 * (options.beta_start - options.beta_end) * (1.0 + math.cos(math.pi * progress)),
            True)


def _difference_terms(view, weight_value, grid):
    """(start, step, movable) as [B, K, C] float32: W~ - W = start + step * h for the weights that move (h their
    rounding up, 0..1), start alone for each group's extremes (their nearest code)."""
    movable = ~grid.frozen
    # floor + 1 never passes the top code: only a group's maximum sits on it, and it is frozen.
    base = np.where(grid.frozen, grid.nearest, grid.floor).astype(np.float32)
    start = base * grid.scale + grid.offset - np.asarray(weight_value, np.float32)
    step = movable.astype(np.float32) * grid.scale
    return (view.to_matrix(start).astype(np.float32), view.to_matrix(step).astype(np.float32),
            view.to_matrix(movable).astype(np.float32))


def optimize(sess, solver, view, gram_matrix, weight_value, grid, options):
    """Run AdaRound's iterations on one layer's quadratic problem; returns the roundings.

    Args:
      sess: a session on the solver's graph.
      solver: an adaround_solver.Solver (built with these options).
      view: the layer's adaround_solver.LinearView.
      gram_matrix: [B, K, K] Gram matrix of the layer's input rows divided by their number (NumPy).
      weight_value: the float weight (NumPy).
      grid: its LayerGrid.
      options: AdaRoundOptions.
    Returns:
      the chosen codes' offsets from floor as an int64 array (0: down, 1: up), the weight's shape.
    """
    start, step, movable = _difference_terms(view, weight_value, grid)
    logits = solver.run(sess, np.asarray(gram_matrix, np.float32), start, step, movable,
                        view.to_matrix(initial_logits(grid)), options.iterations)
    soft = np.clip(1.0 / (1.0 + np.exp(-logits.astype(np.float64))) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    return view.from_matrix((soft >= 0.5).astype(np.int64), grid.position.shape)


def output_error(view, gram_matrix, weight_value, grid, codes):
    """The layer's output error with hard `codes`: squared error summed over output channels, averaged over the
    input rows the Gram matrix was divided by (examples, and positions of a conv), in float64."""
    difference = view.to_matrix(grid.values(codes).astype(np.float64) - np.asarray(weight_value, np.float64))
    gram_matrix = np.asarray(gram_matrix, np.float64)
    return float(np.sum(difference * np.matmul(gram_matrix, difference)))


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
