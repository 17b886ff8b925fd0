"""An independent NumPy implementation of the quantization formula, group by group, in float32.

It follows the issue's formula literally (divide by alpha, multiply by 2^k - 1, divide, multiply by
alpha), so it agrees with the graph's folded form to a few float32 ulps, except at exact rounding ties.
"""
import numpy as np


def quantize_group(values, bits):
    """Q(values) for one range group, following the formula step by step in float32."""
    values = np.asarray(values, dtype=np.float32)
    beta = values.min()
    alpha = np.float32(values.max() - beta) + np.float32(1e-10)
    levels = np.float32(2 ** bits - 1)
    scaled = (values - beta) / alpha
    x_hat = np.round(levels * scaled) / levels
    return (alpha * x_hat + beta).astype(np.float32)


def quantize_np(x, bits, layout="none", channel_axes=(), bucket_size=None):
    """Q(x) with range groups: 'none', 'channel' (one group per index over channel_axes), 'split'."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty_like(x)
    if layout == "none":
        out[...] = quantize_group(x, bits)
    elif layout == "channel":
        channel_shape = [x.shape[a] for a in channel_axes]
        for index in np.ndindex(*channel_shape):
            selector = [slice(None)] * x.ndim
            for axis, i in zip(channel_axes, index):
                selector[axis] = i
            out[tuple(selector)] = quantize_group(x[tuple(selector)], bits)
    elif layout == "split":
        flat = x.reshape(-1)
        result = np.empty_like(flat)
        for start in range(0, flat.size, bucket_size):
            result[start:start + bucket_size] = quantize_group(flat[start:start + bucket_size], bits)
        out = result.reshape(x.shape)
    else:
        raise AssertionError(layout)
    return out


def assert_matches_reference(got, want, x, bits):
    """All values within one quantization step, and all but rare rounding ties within a few ulps."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    step = (np.max(x) - np.min(x)) / (2 ** bits - 1)
    ulps = 4 * np.finfo(np.float32).eps * max(np.abs(x).max(), 1e-30)
    # With 2^16 levels the scaled value carries only ~8 bits of fraction in float32, so the two
    # algebraically equal forms land on different sides of a .5 tie noticeably more often.
    agreement = 0.999 if bits <= 8 else 0.98
    assert np.mean(np.abs(got - want) <= ulps) > agreement, np.abs(got - want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=step * 1.0001 + ulps)
