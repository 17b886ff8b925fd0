"""The tfquant packed model file (suggested extension `.tfq`): quantized codes bit-packed, plus float tensors.

Layout (all integers little-endian):

  offset 0   magic        8 bytes  b"TFQPACK\\x00"
  offset 8   version      uint16   FORMAT_VERSION
  offset 10  flags        uint16   0 (reserved)
  offset 12  index_len    uint32   length of the compressed index
  offset 16  payload_len  uint64   length of the payload region
  offset 24  index        index_len bytes: zlib-compressed UTF-8 JSON (see below)
             zero padding to the next multiple of 8 bytes
             payload      payload_len bytes
             sha256       32 bytes: SHA-256 of every byte before it

The index is {"t": [entry, ...], "m": metadata}.  Each entry has "n" (name), "s" (shape) and "o"
(byte offset of its data from the start of the payload).  A quantized entry adds "q" (bits),
"l" (layout), "a" (channel axes, layouts 'channel' and 'block') and "b" (bucket size, layouts 'split' and
'block'); its data
is the packed codes (see tfquant.export.packing for the bit order), zero padding to a multiple of
4 bytes, then alpha and then beta as float32, one per group.  A plain entry adds "d" (NumPy dtype
string: "<f4", "<i4" or "<i8") and its data is the raw array in C order.  Data lengths are implied
by the entry, so the index stays small; the reader (tfquant.export.packed_reader) checks every range
against payload_len.
"""
import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from tfquant import files
from tfquant.errors import TfquantError
from tfquant.export import packing
from tfquant.layout import RANGE_GROUP_BITS

MAGIC = b"TFQPACK\x00"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHIQ")
DIGEST_SIZE = hashlib.sha256().digest_size
PLAIN_DTYPES = {"<f4": np.float32, "<i4": np.int32, "<i8": np.int64}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class PackedFileError(TfquantError, ValueError):
    """A packed model file is missing, truncated, corrupted or not a tfquant packed model."""


def align(offset, alignment):
    return -(-offset // alignment) * alignment


@dataclass(eq=False)
class QuantizedTensor:
    """A k-bit quantized tensor: integer codes plus one float32 alpha and beta per range group.

    On construction codes become a uint16 array of `shape`, alpha/beta 1-D float32 arrays, and
    channel_axes a tuple of non-negative increasing axes (None unless layout is 'channel' or 'block');
    bucket_size is None unless layout is 'split' or 'block'.
    """
    name: str
    shape: Tuple[int, ...]
    bits: int
    layout: str
    channel_axes: Optional[Tuple[int, ...]]
    bucket_size: Optional[int]
    codes: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tensor name must be a non-empty string, got {self.name!r}")
        self.shape = packing._check_shape(self.shape)
        self.bits = packing.check_bits(self.bits)
        packing._check_layout(self.layout)
        self.channel_axes = (packing.normalize_channel_axes(self.shape, self.channel_axes)
                             if self.layout in ("channel", "block") else None)
        self.bucket_size = (packing._check_bucket(self.bucket_size) if self.layout in ("split", "block")
                            else None)
        try:
            codes = packing.as_codes(self.codes, self.bits)
        except ValueError as e:
            raise ValueError(f"tensor {self.name!r}: {e}") from None
        if codes.size != self.size:
            raise ValueError(f"tensor {self.name!r}: {codes.size} codes for shape {self.shape}")
        self.codes = codes.reshape(self.shape)
        groups = self.num_groups
        self.alpha = np.asarray(self.alpha, dtype=np.float32).reshape(-1)
        self.beta = np.asarray(self.beta, dtype=np.float32).reshape(-1)
        if self.alpha.size != groups or self.beta.size != groups:
            raise ValueError(f"tensor {self.name!r}: layout {self.layout!r} has {groups} groups; got "
                             f"{self.alpha.size} alpha and {self.beta.size} beta values")
        # Every dequantized value lies within |alpha| + |beta|; keeping that finite in float32 keeps
        # the weights finite, as the training graph's always are.
        reach = np.abs(self.alpha, dtype=np.float64) + np.abs(self.beta, dtype=np.float64)
        if not (np.all(np.isfinite(reach)) and np.all(reach <= _FLOAT32_MAX)):
            raise ValueError(f"tensor {self.name!r}: alpha/beta must be finite, with |alpha| + |beta| "
                             "within the float32 range")

    @property
    def size(self):
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def num_groups(self):
        """Number of range groups."""
        return packing.num_groups(self.shape, self.layout, self.channel_axes, self.bucket_size)

    def dequantize(self):
        """Float32 values of this tensor, computed exactly as packing.dequantize specifies.

        Returns:
          a float32 array of `shape`.
        """
        return packing.dequantize(self.codes, self.bits, self.alpha, self.beta, self.shape,
                                  self.layout, self.channel_axes, self.bucket_size)


@dataclass(eq=False)
class FloatTensor:
    """An unquantized tensor stored raw: float32 (any float input is cast to float32), int32 or int64."""
    name: str
    array: np.ndarray

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tensor name must be a non-empty string, got {self.name!r}")
        array = np.asarray(self.array)
        if array.dtype.kind == "f":
            array = array.astype(np.float32, copy=False)
        elif array.dtype not in (np.int32, np.int64):
            raise ValueError(f"tensor {self.name!r}: dtype {array.dtype} not storable; "
                             "use float32, int32 or int64")
        self.array = array


def accounted_bits(tensors):
    """Information content the size bound is measured against.

    Args:
      tensors: QuantizedTensor and FloatTensor objects.
    Returns:
      sum over quantized tensors of n*k + RANGE_GROUP_BITS (64) per group plus, over plain tensors, n times the bit width
      of the stored dtype (32 for float32, so 32*n as the size bound states).
    """
    total = 0
    for t in tensors:
        if isinstance(t, QuantizedTensor):
            total += t.size * t.bits + RANGE_GROUP_BITS * t.num_groups
        elif isinstance(t, FloatTensor):
            total += t.array.size * t.array.dtype.itemsize * 8
        else:
            raise TypeError(f"expected QuantizedTensor or FloatTensor, got {type(t).__name__}")
    return total


def quantized_span(entry_size, bits, groups):
    """(bytes of codes, offset of alpha from the data start, total data bytes) of a quantized entry."""
    code_bytes = packing.packed_size(entry_size, bits)
    alpha_at = align(code_bytes, 4)
    return code_bytes, alpha_at, alpha_at + 8 * groups


def _plan(tensors):
    """Index entries with payload offsets, and the payload length."""
    entries, seen, offset = [], set(), 0
    for t in tensors:
        if not isinstance(t, (QuantizedTensor, FloatTensor)):
            raise TypeError(f"expected QuantizedTensor or FloatTensor, got {type(t).__name__}")
        if t.name in seen:
            raise ValueError(f"duplicate tensor name {t.name!r}")
        seen.add(t.name)
        if isinstance(t, QuantizedTensor):
            offset = align(offset, 4)
            entry = {"n": t.name, "s": list(t.shape), "o": offset, "q": t.bits, "l": t.layout}
            if t.layout in ("channel", "block"):
                entry["a"] = list(t.channel_axes)
            if t.layout in ("split", "block"):
                entry["b"] = t.bucket_size
            offset += quantized_span(t.size, t.bits, t.num_groups)[2]
        else:
            dtype = t.array.dtype.newbyteorder("<").str
            offset = align(offset, t.array.dtype.itemsize)
            entry = {"n": t.name, "s": list(t.array.shape), "o": offset, "d": dtype}
            offset += t.array.nbytes
        entries.append(entry)
    return entries, offset


def _tensor_chunks(t, entry):
    """Yield (payload offset, bytes) pieces of one tensor's data."""
    if isinstance(t, QuantizedTensor):
        # Codes are re-validated here because the dataclass is mutable after construction.
        try:
            codes = packing.pack_codes(t.codes, t.bits)
        except ValueError as e:
            raise ValueError(f"tensor {t.name!r}: {e}") from None
        code_bytes, alpha_at, _ = quantized_span(t.size, t.bits, t.num_groups)
        if len(codes) != code_bytes:
            raise ValueError(f"tensor {t.name!r}: number of codes changed after construction")
        alpha = np.asarray(t.alpha, dtype="<f4").reshape(-1)
        beta = np.asarray(t.beta, dtype="<f4").reshape(-1)
        if alpha.size != t.num_groups or beta.size != t.num_groups:
            raise ValueError(f"tensor {t.name!r}: alpha/beta length changed after construction")
        yield entry["o"], codes
        yield entry["o"] + alpha_at, alpha.tobytes() + beta.tobytes()
    else:
        array = np.asarray(t.array, dtype=entry["d"])
        if list(array.shape) != entry["s"]:
            raise ValueError(f"tensor {t.name!r}: shape changed after construction")
        yield entry["o"], array.tobytes()


def write_packed_model(path, tensors, metadata):
    """Write tensors and metadata to a packed model file, atomically.

    The data goes to a temporary file in the same directory, which replaces `path` only once
    complete; on any failure the temporary file is removed and an existing `path` is untouched.

    Args:
      path: destination file path (str or os.PathLike).
      tensors: QuantizedTensor and FloatTensor objects with distinct names, stored in this order.
      metadata: a JSON-serialisable dict stored in the index (tuples come back as lists).
    Returns:
      the number of bytes written.
    """
    path = os.fspath(path)
    tensors = list(tensors)
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    entries, payload_len = _plan(tensors)
    try:
        index_json = json.dumps({"t": entries, "m": metadata}, separators=(",", ":"),
                                ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata is not JSON-serialisable: {e}") from None
    index = zlib.compress(index_json.encode("utf-8"), 9)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(index), payload_len)
    payload_start = align(HEADER.size + len(index), 8)
    prefix = header + index + bytes(payload_start - HEADER.size - len(index))

    with files.atomic_writer(path) as f:
        digest = hashlib.sha256()

        def emit(data):
            digest.update(data)
            f.write(data)

        emit(prefix)
        written = 0
        for t, entry in zip(tensors, entries):
            for offset, chunk in _tensor_chunks(t, entry):
                if offset < written:
                    raise AssertionError("payload plan overlaps")  # writer bug, not user error
                emit(bytes(offset - written))
                emit(chunk)
                written = offset + len(chunk)
        if written != payload_len:
            raise AssertionError(f"payload plan said {payload_len} bytes, wrote {written}")
        f.write(digest.digest())
    return payload_start + payload_len + DIGEST_SIZE
