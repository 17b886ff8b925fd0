"""Dense bit packing of k-bit quantization codes, range-group layouts and exact float32 dequantization.

Bit order (the on-disk contract, shared with every reader of packed codes):
the codes c_0, c_1, ..., c_{n-1} (each 0 <= c_i < 2**k) form one little-endian bit stream in
which bit b of code c_i (b = 0 is the least significant) is stream bit i*k + b, and stream bit j
is bit (j % 8) of byte j // 8 (bit 0 being the least significant bit of the byte).  Equivalently,
the packed bytes are the little-endian encoding of the integer sum(c_i << (i*k)) in exactly
ceil(n*k / 8) bytes; unused high bits of the last byte are zero.  So k=2 puts 4 codes in a byte
(the first code in the lowest two bits), k=3 puts 8 codes in exactly 3 bytes, k=8 is one byte per
code and k=16 is each code as a little-endian uint16.

Range-group layouts (one float32 alpha and beta per group):
  'none'    one group for the whole tensor;
  'channel' one group per coordinate of `channel_axes` (increasing axis indices, negatives
            allowed), numbered row-major over those axes;
  'split'   the C-order flattened tensor cut into consecutive buckets of `bucket_size` elements,
            element i belonging to group i // bucket_size;
  'block'   per output channel on `channel_axes`, blocks of `bucket_size` consecutive elements of the
            other axes (tfquant.layout: the tensor as a matrix [R, N], groups numbered row-major over
            [ceil(R / bucket_size), N]).
"""
import math

import numpy as np

from tfquant import config
from tfquant.layout import LAYOUTS, GroupLayout

_UNPACK_CHUNK = 1 << 16


def check_bits(bits):
    """The width of packed codes as an int in 1..16 (config.check_bits without the float width)."""
    return config.check_bits("bits", bits, allow_float=False)


def packed_size(count, bits):
    """Number of bytes that `count` codes of `bits` bits occupy when packed.

    Args:
      count: number of codes.
      bits: bits per code (1..16).
    Returns:
      ceil(count * bits / 8).
    """
    bits = check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    return (int(count) * bits + 7) // 8


def as_codes(codes, bits):
    """Validate codes for a k-bit tensor and return them as a flat uint16 array.

    Args:
      codes: array-like of integer codes (integral floats are accepted, since the graph side may
        produce codes as rounded float tensors).
      bits: bits per code (1..16).
    Returns:
      a 1-D uint16 array of the codes in C order.
    """
    bits = check_bits(bits)
    arr = np.asarray(codes)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        # Validate before casting: an integer cast would silently truncate 2.5 or wrap NaN.
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{bits}-bit codes must be integers; got non-integral float values")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{bits}-bit codes must be an integer array, got dtype {arr.dtype}")
    flat = arr.reshape(-1)
    if flat.size:
        lo, hi = flat.min(), flat.max()
        limit = (1 << bits) - 1
        if lo < 0:
            raise ValueError(f"{bits}-bit codes must be >= 0; found code {lo}")
        if hi > limit:
            raise ValueError(f"{bits}-bit codes must be <= {limit}; found code {hi}")
    return flat.astype(np.uint16, copy=False)


def pack_codes(codes, bits):
    """Pack k-bit codes densely into bytes, in the bit order described in the module docstring.

    Args:
      codes: array-like of integer codes in 0..2**bits - 1 (any shape; taken in C order).
      bits: bits per code, 1..16.
    Returns:
      bytes of length ceil(n * bits / 8).
    Raises:
      ValueError: bits outside 1..16 or a code outside 0..2**bits - 1.
    """
    bits = check_bits(bits)
    flat = as_codes(codes, bits)
    if bits == 16:
        return flat.astype("<u2", copy=False).tobytes()
    if bits == 8:
        return flat.astype(np.uint8).tobytes()
    # One column per bit plane, filled by whole-array shifts (a loop over at most 16 planes, not
    # over elements); row-major flattening then yields exactly the stream order of the format.
    planes = np.empty((flat.size, bits), dtype=np.uint8)
    for b in range(bits):
        np.bitwise_and(flat >> b, 1, out=planes[:, b], casting="unsafe")
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data, bits, count):
    """Inverse of pack_codes: read `count` k-bit codes from the start of `data`.

    Args:
      data: bytes-like (bytes, bytearray, memoryview or uint8 array); bytes beyond
        ceil(count * bits / 8) are ignored.
      bits: bits per code, 1..16.
      count: number of codes to read.
    Returns:
      a new, writable 1-D uint16 array of length `count` (uint16 for every k, so callers see one
      dtype regardless of the code width).
    Raises:
      ValueError: bits outside 1..16, negative count, or data shorter than needed.
    """
    bits = check_bits(bits)
    needed = packed_size(count, bits)
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if buf.dtype != np.uint8:
        buf = buf.view(np.uint8)
    if buf.size < needed:
        raise ValueError(
            f"packed data too short: {count} codes of {bits} bits need {needed} bytes, got {buf.size}")
    buf = buf[:needed]
    if bits == 16:
        return buf.view("<u2").astype(np.uint16)
    if bits == 8:
        return buf.astype(np.uint16)
    out = np.zeros(count, dtype=np.uint16)
    # Bit planes are unpacked a chunk at a time: unpacking all at once costs `bits` bytes per code,
    # several times the float32 weights the codes become.  The chunk is a multiple of 8 codes, so
    # every chunk starts on a byte boundary.
    for start in range(0, count, _UNPACK_CHUNK):
        stop = min(count, start + _UNPACK_CHUNK)
        piece = buf[start * bits // 8:(stop * bits + 7) // 8]
        planes = np.unpackbits(piece, count=(stop - start) * bits, bitorder="little").reshape(-1, bits)
        target = out[start:stop]
        for b in range(bits):
            target |= planes[:, b].astype(np.uint16) << np.uint16(b)
    return out


def _check_shape(shape):
    """Normalise a shape to a tuple of non-negative Python ints."""
    try:
        out = tuple(int(d) for d in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of integers, got {shape!r}") from None
    if any(d < 0 for d in out):
        raise ValueError(f"shape dimensions must be non-negative, got {out}")
    return out


def normalize_channel_axes(shape, channel_axes):
    """Validate channel axes against a shape.

    Args:
      shape: the tensor shape.
      channel_axes: an int or a sequence of axis indices (negative values count from the end).
    Returns:
      a tuple of non-negative axis indices in increasing order.
    Raises:
      ValueError: missing, out-of-range, repeated or non-increasing axes.
    """
    shape = _check_shape(shape)
    if channel_axes is None:
        raise ValueError("layout 'channel' needs channel_axes")
    if isinstance(channel_axes, (int, np.integer)):
        channel_axes = (channel_axes,)
    axes = []
    for axis in channel_axes:
        axis = int(axis)
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"channel axis {axis} out of range for shape {shape}")
        axes.append(axis % len(shape))
    if not axes:
        raise ValueError("layout 'channel' needs at least one channel axis")
    # Group numbering is row-major over the axes in order; refusing other orders avoids two
    # components silently disagreeing about which axis varies fastest.
    if any(a >= b for a, b in zip(axes, axes[1:])):
        raise ValueError(f"channel_axes must be distinct and increasing, got {tuple(channel_axes)}")
    return tuple(axes)


def _check_bucket(bucket_size):
    if bucket_size is None or isinstance(bucket_size, bool) or int(bucket_size) != bucket_size \
            or int(bucket_size) < 1:
        raise ValueError(f"layouts 'split' and 'block' need a positive integer bucket_size, got {bucket_size!r}")
    return int(bucket_size)


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def num_groups(shape, layout, channel_axes=None, bucket_size=None):
    """Number of range groups (alpha/beta pairs) of a tensor.

    Args:
      shape: the tensor shape.
      layout: 'none', 'channel', 'split' or 'block'.
      channel_axes: the channel axes (layouts 'channel' and 'block'; ignored otherwise).
      bucket_size: elements per bucket (layouts 'split' and 'block'; ignored otherwise).
    Returns:
      the group count as a Python int.
    """
    shape = _check_shape(shape)
    _check_layout(layout)
    return _layout_of(shape, layout, channel_axes, bucket_size).num_groups(shape)


def _layout_of(shape, layout, channel_axes, bucket_size):
    """The checked GroupLayout of a layout name and its parameters over a tensor of `shape`."""
    if layout == "channel":
        return GroupLayout("channel", channel_axes=normalize_channel_axes(shape, channel_axes))
    if layout == "split":
        return GroupLayout("split", bucket_size=_check_bucket(bucket_size))
    if layout == "block":
        return GroupLayout("block", channel_axes=normalize_channel_axes(shape, channel_axes),
                           bucket_size=_check_bucket(bucket_size))
    return GroupLayout()


def group_index(shape, layout, channel_axes=None, bucket_size=None):
    """Group id of every element of a tensor, in C order.

    Args: as num_groups.
    Returns:
      a 1-D int64 array of length prod(shape).
    """
    shape = _check_shape(shape)
    _check_layout(layout)
    n = math.prod(shape)
    if layout == "none":
        return np.zeros(n, dtype=np.int64)
    if layout == "split":
        return np.arange(n, dtype=np.int64) // _check_bucket(bucket_size)
    if layout == "block":
        return _block_group_index(shape, _layout_of(shape, layout, channel_axes, bucket_size))
    axes = normalize_channel_axes(shape, channel_axes)
    channel_dims = [shape[a] for a in axes]
    ids = np.arange(int(np.prod(channel_dims, dtype=np.int64)), dtype=np.int64)
    # Place the channel ids on their axes with size-1 elsewhere, then broadcast: this avoids
    # materialising one coordinate array per axis.
    broadcastable = [shape[d] if d in axes else 1 for d in range(len(shape))]
    return np.broadcast_to(ids.reshape(broadcastable), shape).reshape(-1).copy()


def _block_group_index(shape, layout):
    """group_index of a 'block' layout: (row // bucket_size) * N + column of the [R, N] matrix view."""
    order, rows, columns = layout.block_matrix(shape)
    matrix = (np.arange(rows, dtype=np.int64)[:, None] // layout.bucket_size) * columns \
        + np.arange(columns, dtype=np.int64)[None, :]
    inverse = [order.index(axis) for axis in range(len(shape))]
    return matrix.reshape([shape[axis] for axis in order]).transpose(inverse).reshape(-1).copy()


def dequantize(codes, bits, alpha, beta, shape, layout, channel_axes=None, bucket_size=None):
    """Dequantize codes as float32(code) * (alpha[g] * float32(1 / (2**k - 1))) + beta[g] in float32.

    This is the exact sequence of float32 operations the quantized TensorFlow graph runs
    (tfquant.ops.dequantize_scale), so the result is bit-identical to the graph's weights.

    Args:
      codes: integer codes (any shape with prod(shape) elements, taken in C order).
      bits: bits per code, 1..16.
      alpha: per-group scales, length num_groups(...); converted to float32.
      beta: per-group offsets, length num_groups(...); converted to float32.
      shape: the tensor shape.
      layout: 'none', 'channel', 'split' or 'block'.
      channel_axes: the channel axes (layouts 'channel' and 'block').
      bucket_size: elements per bucket (layouts 'split' and 'block').
    Returns:
      a float32 array of `shape`.
    """
    bits = check_bits(bits)
    shape = _check_shape(shape)
    flat = as_codes(codes, bits)
    n = math.prod(shape)
    if flat.size != n:
        raise ValueError(f"{flat.size} codes given for shape {shape} ({n} elements)")
    groups = num_groups(shape, layout, channel_axes, bucket_size)
    alpha = np.asarray(alpha, dtype=np.float32).reshape(-1)
    beta = np.asarray(beta, dtype=np.float32).reshape(-1)
    if alpha.size != groups or beta.size != groups:
        raise ValueError(f"layout {layout!r} of shape {shape} has {groups} groups; got "
                         f"{alpha.size} alpha and {beta.size} beta values")
    # dtype=float32 on each ufunc pins the computation to float32 whatever NumPy's promotion
    # rules would pick; separate ufunc calls keep the two roundings separate (no FMA).  The
    # per-group scale and offset are broadcast over a view of the output, so memory stays the
    # output plus the codes (no per-element group index or temporary).
    scale = np.multiply(alpha, np.float32(1.0 / ((1 << bits) - 1)), dtype=np.float32)
    out = flat.astype(np.float32)
    if layout == "channel":
        axes = normalize_channel_axes(shape, channel_axes)
        groups_shape = [shape[d] if d in axes else 1 for d in range(len(shape))]
        _scale_and_shift(out.reshape(shape), scale.reshape(groups_shape), beta.reshape(groups_shape))
    elif layout == "split":
        bucket_size = _check_bucket(bucket_size)
        full = n // bucket_size
        _scale_and_shift(out[:full * bucket_size].reshape(full, bucket_size), scale[:full, None],
                         beta[:full, None])
        if full < groups:
            _scale_and_shift(out[full * bucket_size:], scale[full], beta[full])
    elif layout == "block":
        # The matrix view [R, N] of the codes (a copy when the channel axes are not last), scaled block
        # by block, then put back in the tensor's axis order.
        block_layout = _layout_of(shape, layout, channel_axes, bucket_size)
        order, rows, columns = block_layout.block_matrix(shape)
        matrix = np.ascontiguousarray(out.reshape(shape).transpose(order)).reshape(rows, columns)
        size = block_layout.bucket_size
        for block in range(-(-rows // size)):
            _scale_and_shift(matrix[block * size:(block + 1) * size], scale[block * columns:(block + 1) * columns],
                             beta[block * columns:(block + 1) * columns])
        inverse = [order.index(axis) for axis in range(len(shape))]
        return np.ascontiguousarray(matrix.reshape([shape[axis] for axis in order]).transpose(inverse))
    else:
        _scale_and_shift(out, scale[0], beta[0])
    return out.reshape(shape)


def _scale_and_shift(values, scale, offset):
    """values = values * scale + offset in place, float32, with the two roundings kept separate."""
    np.multiply(values, scale, out=values, dtype=np.float32)
    np.add(values, offset, out=values, dtype=np.float32)
