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
"l" (layout), "a" (channel axes, layout 'channel') and "b" (bucket size, layout 'split'); its data
is the packed codes (see tfquant.export.packing for the bit order), zero padding to a multiple of
4 bytes, then alpha and then beta as float32, one per group.  A plain entry adds "d" (NumPy dtype
string: "<f4", "<i4" or "<i8") and its data is the raw array in C order.  Data lengths are implied
by the entry, so the index stays small; the reader checks every range against payload_len.
"""
import hashlib
import json
import math
import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from tfquant import files
from tfquant.export import packing
from tfquant.layout import RANGE_GROUP_BITS

MAGIC = b"TFQPACK\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHIQ")
_DIGEST_SIZE = hashlib.sha256().digest_size
_PLAIN_DTYPES = {"<f4": np.float32, "<i4": np.int32, "<i8": np.int64}


class PackedFileError(ValueError):
    """A packed model file is missing, truncated, corrupted or not a tfquant packed model."""


def _align(offset, alignment):
    return -(-offset // alignment) * alignment


@dataclass(eq=False)
class QuantizedTensor:
    """A k-bit quantized tensor: integer codes plus one float32 alpha and beta per range group.

    On construction codes become a uint16 array of `shape`, alpha/beta 1-D float32 arrays, and
    channel_axes a tuple of non-negative increasing axes (None unless layout is 'channel');
    bucket_size is None unless layout is 'split'.
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
                             if self.layout == "channel" else None)
        self.bucket_size = packing._check_bucket(self.bucket_size) if self.layout == "split" else None
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


def _quantized_span(entry_size, bits, groups):
    """(bytes of codes, offset of alpha from the data start, total data bytes) of a quantized entry."""
    code_bytes = packing.packed_size(entry_size, bits)
    alpha_at = _align(code_bytes, 4)
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
            offset = _align(offset, 4)
            entry = {"n": t.name, "s": list(t.shape), "o": offset, "q": t.bits, "l": t.layout}
            if t.layout == "channel":
                entry["a"] = list(t.channel_axes)
            elif t.layout == "split":
                entry["b"] = t.bucket_size
            offset += _quantized_span(t.size, t.bits, t.num_groups)[2]
        else:
            dtype = t.array.dtype.newbyteorder("<").str
            offset = _align(offset, t.array.dtype.itemsize)
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
        code_bytes, alpha_at, _ = _quantized_span(t.size, t.bits, t.num_groups)
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
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(index), payload_len)
    payload_start = _align(_HEADER.size + len(index), 8)
    prefix = header + index + bytes(payload_start - _HEADER.size - len(index))

    directory, base = os.path.split(path)
    tmp_path = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide permissions, as for any ordinary output file.
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
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
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
    return payload_start + payload_len + _DIGEST_SIZE


# The index of a real model is a few hundred bytes per tensor and compresses perhaps 10-fold; these
# caps leave ample room for that while refusing zlib bombs (ratios up to ~1000) outright.
INDEX_EXPANSION_LIMIT = 64
INDEX_SLACK_BYTES = 1 << 16
INDEX_ABSOLUTE_LIMIT = 32 * 1024 * 1024
MAX_RANK = 32
_QUANTIZED_KEYS = {"n", "s", "o", "q", "l", "a", "b"}
_PLAIN_KEYS = {"n", "s", "o", "d"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# NumPy cannot describe larger arrays, even empty ones (a zero dimension beside huge ones).
_MAX_ELEMENTS = 2 ** 62


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_field(entry, key, kind, where):
    value = entry.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r} missing or malformed ({value!r})")
    return value


@dataclass
class _EntryPlan:
    """One index entry after validation: where its bytes are and how to build its tensor."""
    name: str
    shape: Tuple[int, ...]
    start: int
    end: int
    bits: Optional[int] = None
    layout: Optional[str] = None
    channel_axes: Optional[Tuple[int, ...]] = None
    bucket_size: Optional[int] = None
    dtype: Optional[str] = None


def _check_entry(entry, number, payload_len):
    """Validate one index entry against the payload length, without touching the payload."""
    where = f"index entry {number}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not an object")
    name = _entry_field(entry, "n", str, where)
    if not name:
        raise ValueError(f"{where}: empty tensor name")
    where = f"index entry {number} ({name!r})"
    allowed = _QUANTIZED_KEYS if "q" in entry else _PLAIN_KEYS
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
    shape = _entry_field(entry, "s", list, where)
    if len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape) \
            or math.prod(d for d in shape if d) > _MAX_ELEMENTS:
        raise ValueError(f"{where}: bad shape {shape!r}; expected at most {MAX_RANK} non-negative integers "
                         f"whose non-zero product is at most {_MAX_ELEMENTS}")
    shape = tuple(shape)
    offset = _entry_field(entry, "o", int, where)
    # Python integers cannot overflow; the product is compared with the payload before any
    # array of that size exists.
    size = math.prod(shape)
    if "q" in entry:
        bits = _entry_field(entry, "q", int, where)
        layout = _entry_field(entry, "l", str, where)
        axes, bucket = entry.get("a"), entry.get("b")
        if ("a" in entry) != (layout == "channel") or ("b" in entry) != (layout == "split"):
            raise ValueError(f"{where}: fields 'a'/'b' do not fit layout {layout!r}")
        if axes is not None and (not isinstance(axes, list) or not all(_is_int(a) for a in axes)):
            raise ValueError(f"{where}: bad channel axes {axes!r}")
        if bucket is not None and not _is_int(bucket):
            raise ValueError(f"{where}: bad bucket size {bucket!r}")
        try:
            packing.check_bits(bits)
            groups = packing.num_groups(shape, layout, axes, bucket)
            axes = packing.normalize_channel_axes(shape, axes) if layout == "channel" else None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
        span, alignment = _quantized_span(size, bits, groups)[2], 4
        plan = _EntryPlan(name, shape, offset, offset + span, bits, layout, axes, bucket)
    else:
        dtype = entry.get("d")
        if dtype not in _PLAIN_DTYPES:
            raise ValueError(f"{where}: unsupported dtype {dtype!r}")
        alignment = np.dtype(dtype).itemsize
        plan = _EntryPlan(name, shape, offset, offset + size * alignment, dtype=dtype)
    if offset < 0 or plan.end > payload_len:
        raise ValueError(f"{where}: data [{offset}, {plan.end}) outside the {payload_len}-byte payload")
    if offset % alignment:
        raise ValueError(f"{where}: offset {offset} is not a multiple of {alignment}")
    return plan


def _check_plans(plans, payload_len):
    """Refuse overlapping data and payload bytes no tensor owns at the end."""
    previous = None
    for plan in sorted(plans, key=lambda p: (p.start, p.end)):
        if previous is not None and plan.start < previous.end and plan.end > plan.start:
            raise ValueError(f"data of {plan.name!r} [{plan.start}, {plan.end}) overlaps that of "
                             f"{previous.name!r} [{previous.start}, {previous.end})")
        if previous is None or plan.end >= previous.end:
            previous = plan
    used = max((plan.end for plan in plans), default=0)
    if used != payload_len:
        raise ValueError(f"payload is {payload_len} bytes but the tensors end at byte {used}")


def _build_tensor(plan, payload):
    """The tensor of a validated entry, read from the payload buffer."""
    if plan.bits is None:
        count = math.prod(plan.shape)
        array = np.frombuffer(payload, dtype=plan.dtype, count=count, offset=plan.start)
        return FloatTensor(plan.name, array.astype(_PLAIN_DTYPES[plan.dtype]).reshape(plan.shape))
    count = math.prod(plan.shape)
    groups = packing.num_groups(plan.shape, plan.layout, plan.channel_axes, plan.bucket_size)
    code_bytes, alpha_at, _ = _quantized_span(count, plan.bits, groups)
    scales = np.frombuffer(payload, dtype="<f4", count=2 * groups, offset=plan.start + alpha_at)
    alpha, beta = scales[:groups].astype(np.float32), scales[groups:].astype(np.float32)
    codes = packing.unpack_codes(payload[plan.start:plan.start + code_bytes], plan.bits, count)
    return QuantizedTensor(plan.name, plan.shape, plan.bits, plan.layout, plan.channel_axes,
                           plan.bucket_size, codes, alpha, beta)


def _read_header(handle, size, fail):
    """(header bytes, index_len, payload_start, payload_len) from the fixed header, checked against the file size."""
    head = handle.read(_HEADER.size)
    if not head:
        raise fail(f"not a tfquant packed model: the file is empty, expected magic {MAGIC!r}")
    if head[:len(MAGIC)] != MAGIC:
        raise fail(f"not a tfquant packed model: bad magic {head[:len(MAGIC)]!r}, expected {MAGIC!r}")
    if size < _HEADER.size + _DIGEST_SIZE:
        raise fail(f"truncated: {size} bytes, shorter than the {_HEADER.size + _DIGEST_SIZE}-byte minimum")
    _, version, flags, index_len, payload_len = _HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise fail(f"unsupported format version {version}; this reader supports version "
                   f"{FORMAT_VERSION} (file from another tfquant release, or corrupted)")
    if flags != 0:
        raise fail(f"reserved header flags are 0x{flags:04x}; expected 0")
    payload_start = _align(_HEADER.size + index_len, 8)
    expected_len = payload_start + payload_len + _DIGEST_SIZE
    if size < expected_len:
        raise fail(f"truncated: file is {size} bytes, header declares {expected_len}")
    if size > expected_len:
        raise fail(f"file is {size} bytes, header declares {expected_len} "
                   "(trailing data or corrupted header)")
    return head, index_len, payload_start, payload_len


def _read_index(data, index_len, payload_start, fail):
    """The index dict: bounded inflation, strict UTF-8 JSON, known keys only."""
    if any(data[_HEADER.size + index_len:payload_start]):
        raise fail("corrupt index: non-zero padding after the compressed index")
    limit = min(INDEX_EXPANSION_LIMIT * index_len + INDEX_SLACK_BYTES, INDEX_ABSOLUTE_LIMIT)
    raw = files.inflate_bounded(memoryview(data)[_HEADER.size:_HEADER.size + index_len], limit,
                                PackedFileError, "corrupt index")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PackedFileError(f"corrupt index: not UTF-8 (byte {e.start})") from None
    index = files.loads_json(text, PackedFileError, "corrupt index")
    if not isinstance(index, dict) or not isinstance(index.get("t"), list) \
            or not isinstance(index.get("m"), dict) or set(index) != {"t", "m"}:
        raise PackedFileError("corrupt index: expected exactly the tensor list 't' and the metadata 'm'")
    return index


def read_packed_model(path):
    """Read and verify a packed model file.

    The file must be a regular file; its header lengths are checked against the file size before
    the rest is read, the index is inflated under a cap, and every entry is validated (shape,
    bits, layout, alignment, bounds, overlaps, duplicate names) before any tensor is built.

    Args:
      path: file path (str or os.PathLike).
    Returns:
      (tensors, metadata): the QuantizedTensor / FloatTensor objects in file order (fresh,
      writable arrays; quantized codes as uint16 arrays of the tensor shape) and the metadata dict.
    Raises:
      PackedFileError: the file is missing, not a regular file, unreadable, has the wrong magic or an
        unsupported version, is truncated, fails the checksum or has an inconsistent index.  The
        message is one line naming the path.
    """
    path = os.fspath(path)

    def fail(message):
        return PackedFileError(f"{path}: {message}")

    handle, size = files.open_regular(path, PackedFileError, "packed model")
    with handle:
        try:
            head, index_len, payload_start, payload_len = _read_header(handle, size, fail)
            # One buffer of the declared size, filled in place: no second copy of the file.
            data = bytearray(size)
            data[:len(head)] = head
            filled = len(head) + (handle.readinto(memoryview(data)[len(head):]) or 0)
            extra = handle.read(1)
        except OSError as e:
            raise fail(f"cannot read packed model ({e.strerror or e})") from None
    if filled != size or extra:
        raise fail(f"file changed size while being read; expected {size} bytes")
    body_end = size - _DIGEST_SIZE
    found = hashlib.sha256(memoryview(data)[:body_end]).hexdigest()
    stored = data[body_end:].hex()
    if found != stored:
        raise fail(f"checksum mismatch (file corrupted or truncated); expected sha256 "
                   f"{stored[:12]}..., found {found[:12]}...")
    try:
        index = _read_index(data, index_len, payload_start, fail)
        plans, names = [], set()
        for number, entry in enumerate(index["t"]):
            plan = _check_entry(entry, number, payload_len)
            if plan.name in names:
                raise ValueError(f"duplicate tensor name {plan.name!r} (index entry {number})")
            names.add(plan.name)
            plans.append(plan)
        _check_plans(plans, payload_len)
        payload = memoryview(data)[payload_start:body_end]
        tensors = [_build_tensor(plan, payload) for plan in plans]
    except PackedFileError as e:
        raise fail(str(e)) from None
    except (ValueError, TypeError) as e:
        raise fail(f"corrupt index: {' '.join(str(e).split())}") from None
    return tensors, index["m"]
