"""Former home of the step-size grids, kept as names for code written against it: LSQ's primitives and the
int32 bias grid are in `tfquant.ops`, the least-squares step search in `tfquant.step_search`, the weight grids
(LSQ, symmetric) in `tfquant.weight_grids`."""
# pylint: disable=unused-import
from tfquant.ops import (  # noqa: F401
    MIN_STEP, lsq_gradient_scale, lsq_quantize, positive_step, quantize_bias, scale_gradient, signed_grid,
    unsigned_grid)
from tfquant.step_search import MSE_STEP_STARTS, gaussian_step_ratio, grouped_mse_step, least_squares_step  # noqa: F401
from tfquant.weight_grids import (  # noqa: F401
    group_elements, lsq_quantize_weight, lsq_weight_codes, narrow_grid, quantize_weight_symmetric,
    symmetric_weight_codes, symmetric_weight_step)
