"""The calibrator interface: observe batches, return a range; built-in calibrators and a user's own."""
import numpy as np
import pytest

from tfquant import calibrate, calibrators


def _batches(rng):
    return [rng.normal(0.3, 1.5, size=(8, 50)) for _ in range(3)]


@pytest.mark.parametrize("name", calibrate.CALIBRATORS)
def test_observing_batches_gives_the_range_of_their_histogram(rng, name):
    """observe per batch then range(bits) == the calibrator's math on one histogram of every value (NumPy)."""
    batches = _batches(rng)
    values = np.concatenate([b.ravel() for b in batches])
    calibrator = calibrators.for_name(name, num_bins=128, percentile=99.0)
    assert calibrator.name == name
    calibrator.expect(values.min(), values.max())
    for batch in batches:
        calibrator.observe(batch)
    histogram = calibrate.RangeHistogram(values.min(), values.max(), num_bins=128)
    counts, _ = np.histogram(values, bins=histogram.edges)
    assert np.abs(calibrator.histogram.counts - counts).sum() <= 2
    histogram.counts = calibrator.histogram.counts.copy()
    expected = {"max": (values.min(), values.max()),
                "percentile": calibrate.percentile_range(histogram, 99.0),
                "mse": calibrate.mse_range(histogram, 4),
                "entropy": calibrate.entropy_range(histogram, 4)}[name]
    assert calibrator.range(4) == pytest.approx(expected)
    assert calibrate.calibrate_range(name, histogram, 4, percentile=99.0) == pytest.approx(expected)


def test_built_in_names_are_the_flag_choices():
    assert [calibrators.for_name(name).name for name in calibrate.CALIBRATORS] == list(calibrate.CALIBRATORS)


def test_a_users_calibrator_through_the_interface(rng, monkeypatch):
    """A subclass overriding `choose` observes batches like the built-in ones and is found by name once registered."""
    monkeypatch.setattr(calibrators, "_REGISTERED", dict(calibrators._REGISTERED))  # registered for this test only
    class HalfMax(calibrators.Calibrator):
        name = "test_half_max"

        def choose(self, histogram, bits):
            return histogram.minimum / 2, histogram.maximum / 2

    assert calibrators.register(HalfMax) is HalfMax
    batches = _batches(rng)
    calibrator = calibrators.for_name("test_half_max")
    calibrator.expect(min(b.min() for b in batches), max(b.max() for b in batches))
    for batch in batches:
        calibrator.observe(batch)
    assert calibrator.range(8) == (min(b.min() for b in batches) / 2, max(b.max() for b in batches) / 2)
    assert calibrate.calibrate_range("test_half_max", calibrator.histogram, 8) == calibrator.range(8)
    with pytest.raises(calibrate.CalibrationError, match="already registered"):
        calibrators.register(HalfMax)


def test_calibrator_errors_are_one_line():
    with pytest.raises(calibrate.CalibrationError, match="observed no values"):
        calibrators.for_name("mse").range(8)
    with pytest.raises(calibrate.CalibrationError, match=r"expected expect\(min, max\) first"):
        calibrators.for_name("max").observe(np.zeros(3))
    with pytest.raises(calibrate.CalibrationError, match="calibrator 'kl' is not known; expected one of max"):
        calibrators.for_name("kl")
    with pytest.raises(calibrate.CalibrationError, match="not a named Calibrator subclass"):
        calibrators.register(object)
