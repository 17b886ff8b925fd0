"""Property tests of tfquant.uniform_quantize over random shapes, bit widths and bucket settings.

One graph and one session (default options, as users run them) serve every example: each (shape, bits,
buckets) combination adds its ops once (Q(x) and Q(Q(x)) of a placeholder) and later examples reuse them.

Tolerances are float32 rounding (a few ulps of the group's magnitude) plus RANGE_EPS where the formula
itself adds it: alpha = max - min + RANGE_EPS puts the top code at max + RANGE_EPS, and a second pass
widens the range by RANGE_EPS again (|Q(Q(x)) - Q(x)| <= RANGE_EPS + rounding; negligible against ulps
for ranges above ~1e-2, dominant for tiny ranges).
"""
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tfquant
from tfquant.ops import RANGE_EPS

tf1 = tf.compat.v1
ULP = float(np.finfo(np.float32).eps)
TINY = float(np.finfo(np.float32).tiny)  # TensorFlow's CPU kernels flush subnormals to zero
# No 'explain' phase: every example it tries builds new ops, which makes a failure slow to report.
SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow],
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])


class _Quantizer:
    """Lazily built Q and Q∘Q ops in one shared graph, keyed by shape and quantization settings."""

    def __init__(self):
        self.graph = tf.Graph()
        self.session = tf1.Session(graph=self.graph, config=tf1.ConfigProto(
            intra_op_parallelism_threads=1, inter_op_parallelism_threads=1))
        self.placeholders, self.ops = {}, {}

    def __call__(self, x, bits, bucket_type, bucket_size):
        """(Q(x), Q(Q(x))) as NumPy arrays."""
        shape = tuple(x.shape)
        key = (shape, bits, bucket_type, bucket_size)
        if key not in self.ops:
            with self.graph.as_default():
                if shape not in self.placeholders:
                    self.placeholders[shape] = tf1.placeholder(tf.float32, shape)
                once = tfquant.uniform_quantize(self.placeholders[shape], bits, bucket_type, bucket_size)
                self.ops[key] = (once, tfquant.uniform_quantize(once, bits, bucket_type, bucket_size))
        return self.session.run(self.ops[key], {self.placeholders[shape]: x})


@pytest.fixture(scope="module")
def quantizer():
    shared = _Quantizer()
    yield shared
    shared.session.close()


def groups(x, bucket_type, bucket_size):
    """The range groups of x as 1-D arrays, in the layout uniform_quantize uses."""
    if bucket_type is None:
        return [x.reshape(-1)]
    if bucket_type == "channel":
        return [x[..., c].reshape(-1) for c in range(x.shape[-1])]
    flat = x.reshape(-1)
    return [flat[i:i + bucket_size] for i in range(0, flat.size, bucket_size)]


shapes = st.integers(1, 4).flatmap(lambda rank: st.tuples(*[st.integers(1, 5)] * rank))
buckets = st.one_of(st.just((None, 256)), st.just(("channel", 256)),
                    st.tuples(st.just("split"), st.integers(1, 40)))
scales = st.sampled_from([1e-30, 1e-12, 1e-6, 1e-3, 1.0, 1e3, 1e12, 1e30])


@st.composite
def tensors(draw):
    """A float32 array of random shape: ([-1, 1] + offset) x scale, so a range can be small against |x|."""
    shape = draw(shapes)
    scale = draw(scales)
    unit = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    offset = draw(st.sampled_from([0.0, 0.5, -3.0]))
    return ((unit + np.float32(offset)) * np.float32(scale)).astype(np.float32)


def _rounding(group):
    """Float32 rounding of values around this group's magnitude (subnormals may become 0)."""
    return 4 * ULP * float(np.max(np.abs(group))) + TINY


@SETTINGS
@given(x=tensors(), bits=st.integers(1, 16), bucket=buckets)
def test_outputs_lie_in_their_group_range(quantizer, x, bits, bucket):
    once, _ = quantizer(x, bits, *bucket)
    assert np.all(np.isfinite(once))
    for xg, qg in zip(groups(x, *bucket), groups(once, *bucket)):
        assert qg.min() >= xg.min() - _rounding(xg), (xg, qg)
        assert qg.max() <= xg.max() + _rounding(xg) + RANGE_EPS, (xg, qg)


@SETTINGS
@given(x=tensors(), bits=st.integers(1, 16), bucket=buckets)
def test_a_group_holds_at_most_2_to_the_k_values(quantizer, x, bits, bucket):
    once, _ = quantizer(x, bits, *bucket)
    for qg in groups(once, *bucket):
        assert len(np.unique(qg)) <= 2 ** bits


@SETTINGS
@given(x=tensors(), bits=st.integers(1, 16), bucket=buckets)
def test_quantizing_twice_changes_nothing(quantizer, x, bits, bucket):
    once, twice = quantizer(x, bits, *bucket)
    for qg, qqg in zip(groups(once, *bucket), groups(twice, *bucket)):
        assert np.max(np.abs(qqg - qg)) <= _rounding(qg) + RANGE_EPS, (qg, qqg)


@SETTINGS
@given(shape=shapes, value=st.sampled_from([0.0, 1.0, -7.25, 1e30, -1e30, 1e-30, 3.3e-38]),
       bits=st.integers(1, 16), bucket=buckets)
def test_constant_tensors_come_back_unchanged(quantizer, shape, value, bits, bucket):
    x = np.full(shape, value, np.float32)
    once, twice = quantizer(x, bits, *bucket)
    np.testing.assert_array_equal(once, x)
    np.testing.assert_array_equal(twice, x)


@SETTINGS
@given(value=st.floats(float(np.float32(-1e30)), float(np.float32(1e30)), width=32), bits=st.integers(1, 16), bucket=buckets)
def test_a_single_element_comes_back_unchanged(quantizer, value, bits, bucket):
    x = np.array([value], np.float32)
    once, _ = quantizer(x, bits, *bucket)
    np.testing.assert_allclose(once, x, rtol=0, atol=TINY)


@SETTINGS
@given(shape=shapes, scale=st.sampled_from([1e30, -1e30, 1e-30, -1e-30]), bits=st.integers(1, 16),
       bucket=buckets, data=st.data())
def test_extreme_magnitudes_stay_finite(quantizer, shape, scale, bits, bucket, data):
    unit = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(0.125, 3, width=32)))
    x = (unit * np.float32(scale)).astype(np.float32)
    once, twice = quantizer(x, bits, *bucket)
    assert np.all(np.isfinite(once)) and np.all(np.isfinite(twice))
    for xg, qg in zip(groups(x, *bucket), groups(once, *bucket)):
        assert xg.min() - _rounding(xg) <= qg.min() and qg.max() <= xg.max() + _rounding(xg) + RANGE_EPS


def test_constant_group_read_at_run_time_stays_finite(quantizer):
    """The smallest cases of the properties above, kept as a plain regression test.

    A constant group fed at run time (placeholder or variable, so grappler cannot fold it away) must come
    back unchanged: with the default session options grappler's constant folding reassociates
    (max - min) + RANGE_EPS into max + (RANGE_EPS - min), RANGE_EPS is absorbed, alpha becomes 0 and the
    codes 0 * inf = NaN.
    """
    cases = [(np.full([3], 0.5, np.float32), (None, 256)),
             (np.array([[0.5, 1.0], [0.5, 2.0]], np.float32), ("channel", 256)),  # a constant channel
             (np.arange(1, 258, dtype=np.float32), ("split", 256))]  # a one-element last piece
    for x, bucket in cases:
        once, _ = quantizer(x, 4, *bucket)
        np.testing.assert_allclose(once[x == x.flat[-1]] if bucket[0] == "split" else once[..., :1],
                                   (x[x == x.flat[-1]] if bucket[0] == "split" else x[..., :1]),
                                   err_msg=str(bucket))
