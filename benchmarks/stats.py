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
