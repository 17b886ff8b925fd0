"""Post-training calibration of activation ranges from histograms (NumPy only, no graph, no session): the math of
the calibrators of tfquant.calibrators (one interface: observe batches, return a range).

A calibrator turns the values one activation took over some batches into the range [lo, hi] its uniform
quantizer uses (the grid of `ops.quantize_in_range`: 2^bits - 1 steps from lo to hi, values clipped).
  max         the observed [min, max]: nothing is clipped, as the moving averages of the uniform learner.
  percentile  the range holding all but (100 - p)% of the values in each tail.
  mse         the clipping range minimising the mean squared quantization error over the histogram.
  entropy     the clipping range minimising the KL divergence between the histogram and its quantized form
              (the TensorRT / pytorch_quantization method, generalised to signed ranges).
MSE and entropy search ranges [f * lo0, f * hi0] that shrink towards zero from the histogram's own range
[lo0, hi0] (which always contains 0), for fractions f = k / num_candidates.
"""
import numpy as np

from tfquant.errors import TfquantError

CALIBRATORS = ("max", "percentile", "mse", "entropy")
DEFAULT_BINS = 2048
DEFAULT_CANDIDATES = 256


class CalibrationError(TfquantError, ValueError):
    """A calibrator cannot produce a range (no values seen, non-finite values, bad settings)."""


class RangeHistogram:
    """Counts of an activation's values in equal bins over a fixed range that contains 0.

    The range is fixed at construction (from a first pass that recorded min and max), so batches can be
    added one at a time and the counts never need re-binning.
    """

    def __init__(self, minimum, maximum, num_bins=DEFAULT_BINS):
        """Args: minimum, maximum: the observed extremes of the values to come; num_bins: bins (>= 2)."""
        if not (np.isfinite(minimum) and np.isfinite(maximum)) or minimum > maximum:
            raise CalibrationError("histogram range [%r, %r] is not valid; expected finite minimum <= maximum"
                                   % (minimum, maximum))
        if int(num_bins) < 2:
            raise CalibrationError("num_bins=%r is not valid; expected an integer >= 2" % (num_bins,))
        self.minimum, self.maximum = float(minimum), float(maximum)
        low, high = min(self.minimum, 0.0), max(self.maximum, 0.0)
        if high == low:
            high = low + 1e-10  # an all-zero tensor still needs a non-empty range
        self.edges = np.linspace(low, high, int(num_bins) + 1)
        self.counts = np.zeros(int(num_bins), np.int64)

    @property
    def centers(self):
        """Midpoints of the bins."""
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    def add(self, values):
        """Count an array of values (values outside the range go to the end bins)."""
        values = np.asarray(values, np.float64).ravel()
        if not np.all(np.isfinite(values)):
            raise CalibrationError("activation values are not all finite; expected finite values to calibrate")
        low, high = self.edges[0], self.edges[-1]
        scaled = (values - low) * (len(self.counts) / (high - low))
        index = np.clip(np.floor(scaled), 0, len(self.counts) - 1).astype(np.int64)
        self.counts += np.bincount(index, minlength=len(self.counts))


def quantize_values(values, bits, lo, hi):
    """The activation quantizer of tfquant.ops in NumPy: clip to [lo, hi], round to 2^bits - 1 steps.

    Args:
      values: array; bits: 1..16; lo, hi: scalars or arrays broadcastable against values.
    Returns:
      float64 array of the quantized values.
    """
    levels = float(2 ** bits - 1)
    width = np.asarray(hi, np.float64) - lo + 1e-10
    codes = np.clip(np.round((values - lo) * (levels / width)), 0.0, levels)
    return codes * (width / levels) + lo


def _candidate_ranges(histogram, num_candidates):
    """Arrays (lo, hi) of the ranges searched, from the largest (the histogram's range) down."""
    fractions = np.arange(num_candidates, 0, -1, dtype=np.float64) / num_candidates
    return fractions * histogram.edges[0], fractions * histogram.edges[-1]


def _check_counts(histogram):
    if histogram.counts.sum() == 0:
        raise CalibrationError("the histogram is empty; expected at least one value to calibrate")


def max_range(histogram):
    """The observed [min, max]."""
    _check_counts(histogram)
    return histogram.minimum, histogram.maximum


def percentile_range(histogram, percentile):
    """[lo, hi] leaving at most (100 - percentile)% of the values outside on each side.

    hi is the right edge of the first bin where the cumulative share reaches percentile %, lo the left
    edge of the first bin where it exceeds 100 - percentile %; both are then limited to [min, max].
    """
    _check_counts(histogram)
    if not 0.0 < percentile <= 100.0:
        raise CalibrationError("percentile=%r is not valid; expected a number in (0, 100]" % (percentile,))
    share = np.cumsum(histogram.counts) / float(histogram.counts.sum())
    upper = int(np.searchsorted(share, percentile / 100.0 - 1e-12, side="left"))
    lower = int(np.searchsorted(share, 1.0 - percentile / 100.0 + 1e-12, side="left"))
    upper, lower = min(upper, len(share) - 1), min(lower, len(share) - 1)
    hi = min(histogram.edges[upper + 1], histogram.maximum)
    lo = max(histogram.edges[lower], histogram.minimum)
    return float(min(lo, hi)), float(hi)


def mse_range(histogram, bits, num_candidates=DEFAULT_CANDIDATES):
    """The candidate range with the least squared error sum(count * (Q(center) - center)^2).

    Ties go to the larger range.
    """
    _check_counts(histogram)
    lows, highs = _candidate_ranges(histogram, num_candidates)
    centers, counts = histogram.centers, histogram.counts.astype(np.float64)
    used = counts > 0
    centers, counts = centers[used], counts[used]
    errors = [np.sum(counts * (quantize_values(centers, bits, lo, hi) - centers) ** 2)
              for lo, hi in zip(lows, highs)]
    best = int(np.argmin(errors))
    return float(lows[best]), float(highs[best])


def _kl_divergence(counts, centers, bits, lo, hi):
    """KL(P || Q): P the histogram clipped to [lo, hi] (outside counts join the end bins kept), Q the bins inside
    [lo, hi] alone, quantized (each level's mass spread evenly over the level's bins non-empty in P).

    Q leaves the clipped mass out, as TensorRT's method does: that is what makes clipping cost something.
    """
    inside = (centers >= lo) & (centers <= hi)
    positions = np.flatnonzero(inside)
    reference = counts[positions].astype(np.float64)
    reference[0] += counts[:positions[0]].sum()
    reference[-1] += counts[positions[-1] + 1:].sum()
    levels = float(2 ** bits - 1)
    level_of_bin = np.round((centers[positions] - lo) * (levels / (hi - lo + 1e-10))).astype(np.int64)
    nonempty = reference > 0
    level_mass = np.bincount(level_of_bin, weights=counts[positions].astype(np.float64))
    level_bins = np.bincount(level_of_bin, weights=nonempty.astype(np.float64))
    expanded = np.where(nonempty, level_mass[level_of_bin] / np.maximum(level_bins[level_of_bin], 1.0), 0.0)
    if np.any(expanded[nonempty] == 0):
        return np.inf  # P has mass where Q has none (a level holding only clipped mass)
    p = reference[nonempty] / reference.sum()
    q = expanded[nonempty] / expanded.sum()
    return float(np.sum(p * np.log(p / q)))


def _zero_bin_flattened(histogram):
    """The counts with the bin that holds 0 given the count of its neighbour.

    A ReLU's output is 0 for 40-60 % of its values, and 0 is a level of every candidate range (each one
    contains 0 and is quantized exactly there). The KL proxy, however, spreads a level's mass evenly over
    the level's bins, so that spike alone would make any range with more than one bin in the level of 0
    look bad: the search then settled on the widest range with under 3 bins per level (hi = 0.37 x max at
    8 bits), clipping 1-5 % of the values and costing MobileNetV2 22 points. pytorch_quantization's entropy
    calibrator flattens the zero bin the same way before its search.
    """
    counts = histogram.counts.copy()
    zero = int(np.clip(np.searchsorted(histogram.edges, 0.0, side="right") - 1, 0, len(counts) - 1))
    counts[zero] = counts[zero + 1] if zero + 1 < len(counts) else counts[zero - 1]
    return counts


def entropy_range(histogram, bits, num_candidates=DEFAULT_CANDIDATES):
    """The candidate range with the least KL divergence between the histogram and its quantized form.

    Only ranges spanning at least 2^bits bins are searched (a narrower one has one bin per level and a
    divergence of 0 that says nothing); when no candidate qualifies (too few bins for the bits) the
    observed [min, max] is returned. Ties go to the larger range. The bin holding 0 is searched with its
    neighbour's count (see _zero_bin_flattened).
    """
    _check_counts(histogram)
    lows, highs = _candidate_ranges(histogram, num_candidates)
    centers, counts = histogram.centers, _zero_bin_flattened(histogram)
    if counts.sum() == 0:
        return max_range(histogram)  # nothing but zeros
    best, best_divergence = None, np.inf
    for lo, hi in zip(lows, highs):
        if np.count_nonzero((centers >= lo) & (centers <= hi)) < 2 ** bits:
            continue
        divergence = _kl_divergence(counts, centers, bits, lo, hi)
        if divergence < best_divergence - 1e-12:
            best, best_divergence = (float(lo), float(hi)), divergence
    return best if best is not None else max_range(histogram)


def calibrate_range(calibrator, histogram, bits, percentile=99.99):
    """The range `calibrator` (one of CALIBRATORS) chooses for a histogram quantized to `bits` bits.

    Args:
      calibrator: 'max', 'percentile', 'mse' or 'entropy'.
      histogram: a RangeHistogram of the activation's values.
      bits: activation bits, 1..16.
      percentile: for 'percentile', in (0, 100].
    Returns:
      (lo, hi) floats with lo <= hi.
    Raises:
      CalibrationError for an unknown calibrator or an empty histogram.
    """
    from tfquant import calibrators  # the interface builds on this module's math
    return calibrators.for_name(calibrator, percentile=percentile).choose(histogram, bits)
