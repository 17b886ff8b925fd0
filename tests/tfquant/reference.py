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


def group_indices(shape, layout="none", channel_axes=(), bucket_size=None):
    """Row-major flat indices of every range group of a tensor of `shape`, numbered as GroupLayout does.

    'none': one group; 'channel': one group per index over channel_axes (row-major over those axes);
    'split': consecutive pieces of bucket_size elements of the flattened tensor, the last maybe shorter.
    """
    size = int(np.prod(shape, dtype=np.int64))
    flat_index = np.arange(size).reshape(shape)
    if layout == "none":
        return [flat_index.reshape(-1)]
    if layout == "channel":
        found = []
        for index in np.ndindex(*[shape[a] for a in channel_axes]):
            selector = [slice(None)] * len(shape)
            for axis, i in zip(channel_axes, index):
                selector[axis] = i
            found.append(flat_index[tuple(selector)].reshape(-1))
        return found
    if layout == "split":
        return [np.arange(start, min(start + bucket_size, size)) for start in range(0, size, bucket_size)]
    raise AssertionError(layout)


def grid_codes(values, bits, range_eps=1e-10):
    """The codes the formula may give each element of one group, computed in float64.

    Float32 evaluation moves t = (x - beta) * (2^k - 1) / alpha by at most a few float32 epsilons
    relative to 2^k - 1 (each of x - beta, max - min + eps, the reciprocal and the product rounds once),
    so round(t) is certain except within that slack of a .5 tie, where either neighbour is correct.
    Returns:
      (lower, upper, beta, alpha): float64 arrays of the smallest and largest code rounding can produce
      (equal wherever the code is not in doubt), and the group's beta = min and alpha = max - min + eps.
    """
    values = np.asarray(values, dtype=np.float64)
    beta = values.min()
    alpha = (values.max() - beta) + range_eps
    levels = float(2 ** bits - 1)
    scaled = (values - beta) * levels / alpha
    slack = 4 * float(np.finfo(np.float32).eps) * levels
    lower = np.clip(np.floor(scaled + 0.5 - slack), 0, levels)
    upper = np.clip(np.floor(scaled + 0.5 + slack), 0, levels)
    return lower, upper, beta, alpha


def grid_candidates(values, bits, range_eps=1e-10):
    """(lower, upper) float64 values beta + code * alpha / (2^k - 1) for the codes of grid_codes."""
    lower, upper, beta, alpha = grid_codes(values, bits, range_eps)
    levels = float(2 ** bits - 1)
    return beta + lower * alpha / levels, beta + upper * alpha / levels
