"""Reading a tfquant packed model file (the format is described in tfquant.export.packed_file) from any source.

A file may be truncated, corrupted or crafted: only a regular file is opened, its header lengths are checked
against its size before the rest is read (into one buffer of that size), the checksum before the index is
parsed, the index is inflated under a cap that refuses compression bombs and parsed as strict JSON, and every
entry (shape, bits, layout, alignment, bounds, overlaps, names) is validated before any array is built.
"""
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from tfquant import files
from tfquant.export import packed_file, packing
from tfquant.export.packed_file import FORMAT_VERSION, MAGIC, FloatTensor, PackedFileError, QuantizedTensor


# The index of a real model is a few hundred bytes per tensor and compresses perhaps 10-fold; these
# caps leave ample room for that while refusing zlib bombs (ratios up to ~1000) outright.
INDEX_EXPANSION_LIMIT = 64
INDEX_SLACK_BYTES = 1 << 16
INDEX_ABSOLUTE_LIMIT = 32 * 1024 * 1024
MAX_RANK = 32
_QUANTIZED_KEYS = {"n", "s", "o", "q", "l", "a", "b"}
_PLAIN_KEYS = {"n", "s", "o", "d"}
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
        if ("a" in entry) != (layout in ("channel", "block")) or ("b" in entry) != (layout in ("split", "block")):
            raise ValueError(f"{where}: fields 'a'/'b' do not fit layout {layout!r}")
        if axes is not None and (not isinstance(axes, list) or not all(_is_int(a) for a in axes)):
            raise ValueError(f"{where}: bad channel axes {axes!r}")
        if bucket is not None and not _is_int(bucket):
            raise ValueError(f"{where}: bad bucket size {bucket!r}")
        try:
            packing.check_bits(bits)
            groups = packing.num_groups(shape, layout, axes, bucket)
            axes = packing.normalize_channel_axes(shape, axes) if layout in ("channel", "block") else None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
        span, alignment = packed_file.quantized_span(size, bits, groups)[2], 4
        plan = _EntryPlan(name, shape, offset, offset + span, bits, layout, axes, bucket)
    else:
        dtype = entry.get("d")
        if dtype not in packed_file.PLAIN_DTYPES:
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
        return FloatTensor(plan.name, array.astype(packed_file.PLAIN_DTYPES[plan.dtype]).reshape(plan.shape))
    count = math.prod(plan.shape)
    groups = packing.num_groups(plan.shape, plan.layout, plan.channel_axes, plan.bucket_size)
    code_bytes, alpha_at, _ = packed_file.quantized_span(count, plan.bits, groups)
    scales = np.frombuffer(payload, dtype="<f4", count=2 * groups, offset=plan.start + alpha_at)
    alpha, beta = scales[:groups].astype(np.float32), scales[groups:].astype(np.float32)
    codes = packing.unpack_codes(payload[plan.start:plan.start + code_bytes], plan.bits, count)
    return QuantizedTensor(plan.name, plan.shape, plan.bits, plan.layout, plan.channel_axes,
                           plan.bucket_size, codes, alpha, beta)


def _read_header(handle, size, fail):
    """(header bytes, index_len, payload_start, payload_len) from the fixed header, checked against the file size."""
    head = handle.read(packed_file.HEADER.size)
    if not head:
        raise fail(f"not a tfquant packed model: the file is empty, expected magic {MAGIC!r}")
    if head[:len(MAGIC)] != MAGIC:
        raise fail(f"not a tfquant packed model: bad magic {head[:len(MAGIC)]!r}, expected {MAGIC!r}")
    if size < packed_file.HEADER.size + packed_file.DIGEST_SIZE:
        raise fail(f"truncated: {size} bytes, shorter than the {packed_file.HEADER.size + packed_file.DIGEST_SIZE}-byte minimum")
    _, version, flags, index_len, payload_len = packed_file.HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise fail(f"unsupported format version {version}; this reader supports version "
                   f"{FORMAT_VERSION} (file from another tfquant release, or corrupted)")
    if flags != 0:
        raise fail(f"reserved header flags are 0x{flags:04x}; expected 0")
    payload_start = packed_file.align(packed_file.HEADER.size + index_len, 8)
    expected_len = payload_start + payload_len + packed_file.DIGEST_SIZE
    if size < expected_len:
        raise fail(f"truncated: file is {size} bytes, header declares {expected_len}")
    if size > expected_len:
        raise fail(f"file is {size} bytes, header declares {expected_len} "
                   "(trailing data or corrupted header)")
    return head, index_len, payload_start, payload_len


def _read_index(data, index_len, payload_start, fail):
    """The index dict: bounded inflation, strict UTF-8 JSON, known keys only."""
    if any(data[packed_file.HEADER.size + index_len:payload_start]):
        raise fail("corrupt index: non-zero padding after the compressed index")
    limit = min(INDEX_EXPANSION_LIMIT * index_len + INDEX_SLACK_BYTES, INDEX_ABSOLUTE_LIMIT)
    raw = files.inflate_bounded(memoryview(data)[packed_file.HEADER.size:packed_file.HEADER.size + index_len], limit,
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
    body_end = size - packed_file.DIGEST_SIZE
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
