"""Timing statistics of the benchmarks."""
import statistics
import time


def median(values):
    """Median of a non-empty iterable of numbers, as float."""
    values = list(values)
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def mean_std(values):
    """(mean, sample standard deviation) of a non-empty list; the deviation is None for one value."""
    values = list(values)
    if not values:
        raise ValueError("mean of no values")
    return float(statistics.mean(values)), (float(statistics.stdev(values)) if len(values) > 1 else None)


def timed(fn):
    """(seconds, result) of one call of fn(), on the monotonic high-resolution clock."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# Two-sided 95 % quantiles of Student's t distribution, t_{0.975}(df), for df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
_Z975 = 1.959964


def t_quantile_975(df):
    """t_{0.975} of Student's t with `df` >= 1 degrees of freedom (the 95 % two-sided interval's factor).

    A table up to 30; beyond it the Cornish-Fisher expansion in 1/df, within 1e-4 of the exact value there.
    """
    if df < 1:
        raise ValueError("df=%r is not valid; expected at least 1" % (df,))
    if df <= len(_T975):
        return _T975[int(df) - 1]
    z = _Z975
    return (z + (z ** 3 + z) / (4.0 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96.0 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384.0 * df ** 3))


def mean_interval(values):
    """(mean, low, high) of the 95 % t-interval of the mean of `values` (at least 2 numbers)."""
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError("an interval needs at least 2 values, got %d" % len(values))
    mean, std = mean_std(values)
    half = t_quantile_975(len(values) - 1) * std / len(values) ** 0.5
    return mean, mean - half, mean + half
