"""Calibrators against independent NumPy references on fixed histograms."""
import math

import numpy as np
import pytest

from tfquant import calibrate


def fixed_histogram(signed, num_bins=64):
    """A histogram with hand-set counts: a peak near zero, a decaying tail and a few far outliers."""
    minimum, maximum = (-3.0, 5.0) if signed else (0.0, 6.0)
    histogram = calibrate.RangeHistogram(minimum, maximum, num_bins=num_bins)
    centers = histogram.centers
    counts = np.round(1000.0 * np.exp(-np.abs(centers) * 1.5)).astype(np.int64)
    counts[-1] += 3  # outliers at the top end
    if signed:
        counts[0] += 2
    histogram.counts = counts
    return histogram


def reference_quantize(value, bits, lo, hi):
    """Scalar quantizer written out step by step, independent of calibrate.quantize_values."""
    levels = 2 ** bits - 1
    step = (hi - lo + 1e-10) / levels
    clipped = min(max(value, lo), hi)
    return lo + step * round((clipped - lo) / step)


def candidates(histogram, count):
    return [(histogram.edges[0] * k / count, histogram.edges[-1] * k / count) for k in range(count, 0, -1)]


def test_histogram_counts_match_numpy_histogram():
    rng = np.random.default_rng(0)
    values = rng.normal(0.5, 2.0, size=5000)
    histogram = calibrate.RangeHistogram(values.min(), values.max(), num_bins=50)
    histogram.add(values[:2000])
    histogram.add(values[2000:])
    expected, _ = np.histogram(values, bins=histogram.edges)
    assert histogram.counts.sum() == len(values)
    # Values exactly on an inner edge may fall either side in floating point; allow one per edge.
    assert np.abs(histogram.counts - expected).sum() <= 2


def test_max_is_the_observed_range():
    values = np.array([-1.25, 0.5, 3.75])
    histogram = calibrate.RangeHistogram(values.min(), values.max(), num_bins=16)
    histogram.add(values)
    assert calibrate.calibrate_range("max", histogram, 8) == (-1.25, 3.75)


@pytest.mark.parametrize("percentile", [90.0, 99.0, 99.9])
def test_percentile_brackets_numpy_percentile(percentile):
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.0, 1.0, 20000), [40.0, -35.0]])
    histogram = calibrate.RangeHistogram(values.min(), values.max(), num_bins=4096)
    histogram.add(values)
    lo, hi = calibrate.calibrate_range("percentile", histogram, 8, percentile=percentile)
    width = histogram.edges[1] - histogram.edges[0]
    assert abs(hi - np.percentile(values, percentile)) <= width + 1e-9
    assert abs(lo - np.percentile(values, 100.0 - percentile)) <= width + 1e-9
    assert calibrate.calibrate_range("percentile", histogram, 8, percentile=100.0) == pytest.approx(
        (values.min(), values.max()))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_matches_brute_force_over_bins(signed, bits):
    histogram = fixed_histogram(signed)
    # Every value of a bin sits at its center: the squared error of a bin is count * error at the center.
    pairs = list(zip(histogram.centers, histogram.counts))
    errors = []
    for lo, hi in candidates(histogram, 64):
        errors.append(sum(n * (reference_quantize(v, bits, lo, hi) - v) ** 2 for v, n in pairs))
    best = candidates(histogram, 64)[int(np.argmin(errors))]
    assert calibrate.mse_range(histogram, bits, num_candidates=64) == pytest.approx(best)
    if bits <= 4:
        # At a few bits the search must cut the far outliers off, not keep the full range.
        assert best[1] < histogram.edges[-1]


def reference_kl(counts, centers, bits, lo, hi):
    """KL divergence of the clipped histogram from its quantized form, written with plain loops."""
    inside = [i for i, c in enumerate(centers) if lo <= c <= hi]
    p = {i: float(counts[i]) for i in inside}
    p[inside[0]] += float(sum(counts[i] for i in range(len(counts)) if i < inside[0]))
    p[inside[-1]] += float(sum(counts[i] for i in range(len(counts)) if i > inside[-1]))
    levels = 2 ** bits - 1
    groups = {}
    for i in inside:
        groups.setdefault(int(np.round((centers[i] - lo) * levels / (hi - lo + 1e-10))), []).append(i)
    q = {}
    for members in groups.values():
        mass = sum(float(counts[i]) for i in members)  # without the clipped mass
        nonempty = [i for i in members if p[i] > 0]
        for i in members:
            q[i] = mass / len(nonempty) if p[i] > 0 else 0.0
    if any(p[i] > 0 and q[i] == 0 for i in inside):
        return float("inf")
    p_total, q_total = sum(p.values()), sum(q.values())
    return sum((p[i] / p_total) * math.log((p[i] / p_total) / (q[i] / q_total)) for i in inside if p[i] > 0)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 3])
def test_entropy_matches_loop_reference(signed, bits):
    histogram = fixed_histogram(signed, num_bins=96)
    # The bin holding 0 enters the search with the count of the bin after it (pytorch_quantization's rule).
    counts = list(histogram.counts)
    zero = next(i for i in range(len(counts)) if histogram.edges[i] <= 0.0 < histogram.edges[i + 1])
    counts[zero] = counts[zero + 1]
    best, best_kl = None, float("inf")
    for lo, hi in candidates(histogram, 48):
        if sum(1 for c in histogram.centers if lo <= c <= hi) < 2 ** bits:
            continue
        divergence = reference_kl(counts, histogram.centers, bits, lo, hi)
        if divergence < best_kl - 1e-12:
            best, best_kl = (lo, hi), divergence
    assert calibrate.entropy_range(histogram, bits, num_candidates=48) == pytest.approx(best)
    assert best[1] < histogram.edges[-1]


def test_entropy_without_enough_bins_falls_back_to_max():
    histogram = fixed_histogram(False, num_bins=64)
    assert calibrate.entropy_range(histogram, 8) == calibrate.max_range(histogram)


def test_errors_are_calibration_errors():
    empty = calibrate.RangeHistogram(0.0, 1.0, num_bins=8)
    for name in calibrate.CALIBRATORS:
        with pytest.raises(calibrate.CalibrationError, match="empty"):
            calibrate.calibrate_range(name, empty, 8)
    with pytest.raises(calibrate.CalibrationError, match="not known"):
        calibrate.calibrate_range("kl", fixed_histogram(False), 8)
    with pytest.raises(calibrate.CalibrationError, match="not all finite"):
        empty.add([0.0, np.nan])
    with pytest.raises(calibrate.CalibrationError, match="percentile"):
        calibrate.percentile_range(fixed_histogram(False), 0.0)


def test_entropy_is_not_steered_by_the_zeros_of_a_relu():
    """Half the values exactly 0 (a ReLU) and a half-normal rest: entropy must clip only the far tail, as
    max and mse do, not the 0.37 x max the zero spike used to force (13 % of the positive values clipped)."""
    rng = np.random.default_rng(4)
    values = np.maximum(rng.normal(size=400000), 0.0)
    histogram = calibrate.RangeHistogram(values.min(), values.max())
    histogram.add(values)
    for bits in (4, 8):
        _, hi = calibrate.entropy_range(histogram, bits)
        clipped = np.mean(values[values > 0] > hi)
        assert clipped < 0.01, (bits, hi, clipped)
