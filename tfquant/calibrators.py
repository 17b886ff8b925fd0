"""The calibrator interface: one way to choose an activation's range from the values it took over some batches.

A calibrator observes batches (`observe`, after `expect` gave it the extremes a first pass recorded, so its
histogram never needs re-binning) and then returns the range [lo, hi] for a bit width (`range`). Max, percentile,
MSE and entropy are implementations (their math is tfquant.calibrate's); a user's own calibrator subclasses
Calibrator and overrides `choose` (a histogram and bits in, a range out), and `for_name` returns it by name once it
is registered with `register`.
"""
from tfquant.calibrate import (DEFAULT_BINS, CalibrationError, RangeHistogram, entropy_range,
                               max_range, mse_range, percentile_range)


class Calibrator:
    """Observes an activation's values and chooses its range; subclasses override `choose`."""

    name = None

    def __init__(self, num_bins=DEFAULT_BINS):
        self.num_bins = num_bins
        self.histogram = None

    def expect(self, minimum, maximum):
        """Fix the histogram's range to the extremes [minimum, maximum] of the values to come."""
        self.histogram = RangeHistogram(minimum, maximum, self.num_bins)

    def observe(self, values):
        """Count one batch of the activation's values (after `expect`)."""
        if self.histogram is None:
            raise CalibrationError("calibrator %s observed values before their extremes; expected expect(min, max) "
                                   "first" % self.name)
        self.histogram.add(values)

    def range(self, bits):
        """(lo, hi), lo <= hi: the range this calibrator chooses for the values observed, at `bits` bits."""
        if self.histogram is None:
            raise CalibrationError("calibrator %s has observed no values; expected at least one batch" % self.name)
        return self.choose(self.histogram, bits)

    def choose(self, histogram, bits):
        """The range for a RangeHistogram quantized to `bits` bits (1..16)."""
        raise NotImplementedError


class MaxCalibrator(Calibrator):
    """The observed [min, max]: nothing is clipped."""

    name = "max"

    def choose(self, histogram, bits):
        return max_range(histogram)


class PercentileCalibrator(Calibrator):
    """The range holding all but (100 - percentile)% of the values in each tail."""

    name = "percentile"

    def __init__(self, num_bins=DEFAULT_BINS, percentile=99.99):
        super().__init__(num_bins)
        self.percentile = percentile

    def choose(self, histogram, bits):
        return percentile_range(histogram, self.percentile)


class MseCalibrator(Calibrator):
    """The clipping range of least squared quantization error."""

    name = "mse"

    def choose(self, histogram, bits):
        return mse_range(histogram, bits)


class EntropyCalibrator(Calibrator):
    """The clipping range of least KL divergence between the histogram and its quantized form."""

    name = "entropy"

    def choose(self, histogram, bits):
        return entropy_range(histogram, bits)


# The built-in ones, in the order of tfquant.calibrate.CALIBRATORS (the names the flags accept).
_REGISTERED = {calibrator.name: calibrator for calibrator in (MaxCalibrator, PercentileCalibrator, MseCalibrator,
                                                              EntropyCalibrator)}


def register(calibrator_class):
    """Make a Calibrator subclass with a new `name` available to `for_name`; returns it (usable as a decorator)."""
    named = isinstance(calibrator_class, type) and issubclass(calibrator_class, Calibrator) and calibrator_class.name
    if not named:
        raise CalibrationError("%r is not a named Calibrator subclass; expected one with a `name`"
                               % (calibrator_class,))
    if calibrator_class.name in _REGISTERED:
        raise CalibrationError("calibrator %r is already registered; expected a new name" % calibrator_class.name)
    _REGISTERED[calibrator_class.name] = calibrator_class
    return calibrator_class


def for_name(name, num_bins=DEFAULT_BINS, percentile=99.99):
    """A new calibrator of the registered class `name` ('percentile' takes `percentile`)."""
    if name not in _REGISTERED:
        raise CalibrationError("calibrator %r is not known; expected one of %s" % (name, ", ".join(_REGISTERED)))
    if name == PercentileCalibrator.name:
        return PercentileCalibrator(num_bins, percentile)
    return _REGISTERED[name](num_bins)
