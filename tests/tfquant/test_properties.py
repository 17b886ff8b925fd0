"""Property tests of tfquant's weight quantization over random shapes, bit widths and range-group layouts.

For every range group of x (k bits, L = 2^k - 1, alpha = max - min + RANGE_EPS) the formula guarantees:
  - error bound: |Q(x) - x| <= alpha / (2L), since Q(x) = beta + round(t) * alpha / L with
    t = (x - beta) * L / alpha, and |round(t) - t| <= 1/2;
  - the group minimum comes back bit for bit (code 0: 0 * scale + beta is beta exactly); the group maximum
    comes back as min + alpha = max + RANGE_EPS whenever its code is certainly L (narrow ranges against
    RANGE_EPS round the maximum to a lower code: only the error bound holds there);
  - agreement with the float64 NumPy reference (tests/tfquant/reference.py) except where float32 cannot
    decide a .5 tie, where either neighbouring code is accepted;
  - at most 2^k distinct values per group, and quantizing twice moves nothing by more than RANGE_EPS.
Every tolerance is ROUNDING_EPS float32 epsilons of |min| + |max| + RANGE_EPS (the range the formula
works on): the output is at most that far from the exact value of the code float32 picked.

The same checks are run against deliberately broken copies of the quantizer (all values mapped to the
group minimum, too few levels, a dequantization scale off by one level, one range for the whole tensor),
which they must reject.

One graph and one session (default options, as users run them) serve every example: each (shape, bits,
layout) adds its ops once (Q(x) and Q(Q(x)) of a placeholder); later examples reuse them.
"""
import collections

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tfquant
from tfquant.ops import RANGE_EPS
from tests.tfquant import reference

tf1 = tf.compat.v1
EPS32 = float(np.finfo(np.float32).eps)
# Worst case of the float32 chain: ~2.5 eps of t's relative error (times alpha) plus the dequantization
# product and sum; 4 is a bound with room that still rejects any error of one quantization step.
ROUNDING_EPS = 4
# No 'explain' phase: every example it tries builds new ops, which makes a failure slow to report.
SETTINGS = settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow],
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])

Layout = collections.namedtuple("Layout", "kind channel_axes bucket_size")


def _groups(shape, layout):
    return reference.group_indices(shape, layout.kind, layout.channel_axes, layout.bucket_size)


def _tf_quantize(x, bits, layout):
    """Q(x) through the public API: uniform_quantize where it can express the layout, else quantize_weight."""
    if layout.kind == "none":
        return tfquant.uniform_quantize(x, bits)
    if layout.kind == "split":
        return tfquant.uniform_quantize(x, bits, "split", layout.bucket_size)
    if layout.channel_axes == (x.shape.rank - 1,):
        return tfquant.uniform_quantize(x, bits, "channel")
    return tfquant.quantize_weight(x, bits, tfquant.GroupLayout("channel", channel_axes=layout.channel_axes))


class _Quantizer:
    """Lazily built Q and Q∘Q ops in one shared graph, keyed by shape and quantization settings."""

    def __init__(self):
        self.graph = tf.Graph()
        self.session = tf1.Session(graph=self.graph, config=tf1.ConfigProto(
            intra_op_parallelism_threads=1, inter_op_parallelism_threads=1))
        self.placeholders, self.ops = {}, {}

    def __call__(self, x, bits, layout):
        """(Q(x), Q(Q(x))) as NumPy arrays."""
        shape = tuple(x.shape)
        key = (shape, bits, layout)
        if key not in self.ops:
            with self.graph.as_default():
                if shape not in self.placeholders:
                    self.placeholders[shape] = tf1.placeholder(tf.float32, shape)
                once = _tf_quantize(self.placeholders[shape], bits, layout)
                self.ops[key] = (once, _tf_quantize(once, bits, layout))
        return self.session.run(self.ops[key], {self.placeholders[shape]: x})


@pytest.fixture(scope="module")
def quantizer():
    shared = _Quantizer()
    yield shared
    shared.session.close()


# ----------------------------------------------------------------------------- the checks

def _rounding(group):
    return ROUNDING_EPS * EPS32 * (abs(float(group.min())) + abs(float(group.max())) + RANGE_EPS)


def _per_group(x, quantized, groups):
    """(x, Q(x)) of each group as float64 arrays, the group's rounding tolerance, and its alpha."""
    for index in groups:
        xg = x.reshape(-1)[index].astype(np.float64)
        qg = quantized.reshape(-1)[index].astype(np.float64)
        yield xg, qg, _rounding(xg), (xg.max() - xg.min()) + RANGE_EPS


def check_error_bound(x, quantized, bits, groups):
    for xg, qg, rounding, alpha in _per_group(x, quantized, groups):
        bound = alpha / (2 * (2 ** bits - 1)) + rounding
        worst = np.max(np.abs(qg - xg))
        assert worst <= bound, "error %r > bound %r in group %r -> %r" % (worst, bound, xg, qg)


def check_min_and_max(x, quantized, bits, groups):
    levels = 2 ** bits - 1
    for index in groups:
        xg, qg = x.reshape(-1)[index], quantized.reshape(-1)[index]
        low, high = xg.min(), xg.max()
        np.testing.assert_array_equal(qg[xg == low], low, err_msg="group minimum not reproduced")
        lower_codes, _, _, alpha = reference.grid_codes(xg, bits, RANGE_EPS)
        if lower_codes.max() == levels:  # the maximum's code is certainly L: Q(max) = min + alpha
            worst = np.max(np.abs(qg[xg == high].astype(np.float64) - (float(low) + alpha)))
            assert worst <= _rounding(xg), "group maximum %r came back %r (levels %d)" % (
                high, qg[xg == high], levels)


def check_reference(x, quantized, bits, groups):
    for xg, qg, rounding, _ in _per_group(x, quantized, groups):
        lower, upper = reference.grid_candidates(xg, bits, RANGE_EPS)
        miss = np.minimum(np.abs(qg - lower), np.abs(qg - upper))
        assert np.all(miss <= rounding), "group %r: got %r, reference %r / %r" % (xg, qg, lower, upper)


def check_level_count(x, quantized, bits, groups):
    for index in groups:
        assert len(np.unique(quantized.reshape(-1)[index])) <= 2 ** bits


def check_idempotent(quantized, twice, groups):
    for index in groups:
        qg, qqg = quantized.reshape(-1)[index], twice.reshape(-1)[index]
        # A second pass sees the range [min, max + RANGE_EPS] and widens it by RANGE_EPS again.
        assert np.max(np.abs(qqg.astype(np.float64) - qg)) <= _rounding(qg) + RANGE_EPS, (qg, qqg)


def check_all(x, quantized, twice, bits, groups):
    assert quantized.shape == x.shape and quantized.dtype == np.float32
    assert np.all(np.isfinite(quantized)) and np.all(np.isfinite(twice))
    check_error_bound(x, quantized, bits, groups)
    check_min_and_max(x, quantized, bits, groups)
    check_reference(x, quantized, bits, groups)
    check_level_count(x, quantized, bits, groups)
    check_idempotent(quantized, twice, groups)


# ----------------------------------------------------------------------------- inputs

@st.composite
def cases(draw):
    """(x, bits, layout): x = (unit + offset) * scale in float32, unit random floats or small integers.

    Integer units put many elements exactly on .5 ties of the grid; offsets make the range small
    against |x|; scales from 1e-30 to 1e30 reach both float32 ends.
    """
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(rank))
    kind = draw(st.sampled_from(["none", "channel", "split"]))
    axes, bucket = (), None
    if kind == "channel":
        axes = tuple(sorted(draw(st.sets(st.integers(0, rank - 1), min_size=1))))
    elif kind == "split":
        bucket = draw(st.integers(1, 40))
    elements = draw(st.sampled_from([st.floats(-1, 1, width=32), st.integers(-4, 4).map(float)]))
    unit = draw(hnp.arrays(np.float32, shape, elements=elements))
    offset = np.float32(draw(st.sampled_from([0.0, 0.5, -3.0])))
    scale = np.float32(draw(st.sampled_from([1e-30, 1e-12, 1e-6, 1e-3, 1.0, 1e3, 1e12, 1e30])))
    x = ((unit + offset) * scale).astype(np.float32)
    # TensorFlow's CPU kernels flush subnormal inputs to zero, so an input is drawn normal or zero.
    x[np.abs(x) < np.finfo(np.float32).tiny] = 0.0
    return x, draw(st.integers(1, 16)), Layout(kind, axes, bucket)


@SETTINGS
@given(case=cases())
def test_quantization_properties_hold_per_group(quantizer, case):
    x, bits, layout = case
    once, twice = quantizer(x, bits, layout)
    check_all(x, once, twice, bits, _groups(x.shape, layout))


# ----------------------------------------------------------------------------- broken copies

def _per_group_numpy(quantize_group):
    """A whole-tensor quantizer applying quantize_group(values, bits) to every range group."""

    def quantize(x, bits, groups):
        out = x.reshape(-1).copy()
        for index in groups:
            out[index] = quantize_group(out[index].astype(np.float64), bits)
        return out.reshape(x.shape).astype(np.float32)

    return quantize


def _grid(values, bits, levels, dequantize_levels):
    """The formula with `levels` steps for the codes and `dequantize_levels` for the way back (both 2^k - 1
    when correct)."""
    beta = values.min()
    alpha = values.max() - beta + RANGE_EPS
    return beta + np.round((values - beta) * levels / alpha) * alpha / dequantize_levels


BROKEN = {
    "everything to the group minimum": _per_group_numpy(lambda v, bits: np.full_like(v, v.min())),
    "2^k - 2 levels": _per_group_numpy(lambda v, bits: _grid(v, bits, max(2 ** bits - 2, 1),
                                                             max(2 ** bits - 2, 1))),
    "2^k + 1 levels": _per_group_numpy(lambda v, bits: _grid(v, bits, 2 ** bits, 2 ** bits)),
    "dequantized with 2^k": _per_group_numpy(lambda v, bits: _grid(v, bits, 2 ** bits - 1, 2 ** bits)),
}


def _whole_tensor_range(x, bits, groups):
    """The correct formula with one range for the whole tensor, whatever the layout."""
    return _per_group_numpy(reference.quantize_group)(x, bits, [np.arange(x.size)])


BROKEN["one range for the whole tensor"] = _whole_tensor_range
CHECKS = {"error bound": lambda x, q, qq, bits, groups: check_error_bound(x, q, bits, groups),
          "min and max": lambda x, q, qq, bits, groups: check_min_and_max(x, q, bits, groups),
          "reference": lambda x, q, qq, bits, groups: check_reference(x, q, bits, groups),
          "level count": lambda x, q, qq, bits, groups: check_level_count(x, q, bits, groups),
          "all": check_all}
# Which check must catch which fault (the reference and check_all must catch every one).
MUST_REJECT = [(fault, check) for fault in BROKEN for check in ("reference", "all")] + [
    ("everything to the group minimum", "error bound"),
    ("everything to the group minimum", "min and max"),
    ("2^k - 2 levels", "error bound"),
    ("2^k + 1 levels", "level count"),
    ("dequantized with 2^k", "min and max"),
    ("one range for the whole tensor", "min and max"),
]


@pytest.mark.parametrize("fault,check", MUST_REJECT)
def test_the_checks_reject_a_broken_quantizer(fault, check):
    broken, run_check = BROKEN[fault], CHECKS[check]

    # derandomize: the same 300 cases on every run, so whether a fault is caught does not depend on luck.
    @settings(deadline=None, max_examples=300, database=None, phases=[Phase.generate], derandomize=True,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def search(case):
        x, bits, layout = case
        groups = _groups(x.shape, layout)
        once = broken(x, bits, groups)
        run_check(x, once, broken(once, bits, groups), bits, groups)

    with pytest.raises(AssertionError):
        search()


def test_the_checks_accept_the_reference_itself():
    """The checks are not so strict that the exact formula fails them (the broken tests mean something)."""
    rng = np.random.default_rng(7)
    for bits in (1, 2, 4, 8, 16):
        for layout in (Layout("none", (), None), Layout("channel", (0, 2), None), Layout("split", (), 7)):
            x = (rng.standard_normal((3, 4, 5)) * 10.0 ** rng.integers(-6, 6)).astype(np.float32)
            groups = _groups(x.shape, layout)
            correct = _per_group_numpy(reference.quantize_group)
            once = correct(x, bits, groups)
            check_all(x, once, correct(once, bits, groups), bits, groups)


def test_constant_group_read_at_run_time_stays_finite(quantizer):
    """A constant group fed at run time (placeholder, so grappler cannot fold it away) comes back unchanged.

    With the default session options grappler's constant folding can reassociate (max - min) + RANGE_EPS
    into max + (RANGE_EPS - min): RANGE_EPS is absorbed, alpha becomes 0 and the codes 0 * inf = NaN.
    """
    cases_ = [(np.full([3], 0.5, np.float32), Layout("none", (), None)),
              (np.array([[0.5, 1.0], [0.5, 2.0]], np.float32), Layout("channel", (1,), None)),
              (np.arange(1, 258, dtype=np.float32), Layout("split", (), 256))]  # a one-element last piece
    for x, layout in cases_:
        once, twice = quantizer(x, 4, layout)
        groups = _groups(x.shape, layout)
        check_all(x, once, twice, 4, groups)
        constant = groups[0] if layout.kind == "channel" else groups[-1]
        np.testing.assert_array_equal(once.reshape(-1)[constant], x.reshape(-1)[constant], err_msg=str(layout))
