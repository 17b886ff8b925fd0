"""Tests for tfquant.export.packed_file and packed_reader: round trips, the size bound, corruption detection, atomic writes."""
import json
import os

import numpy as np
import pytest

from tfquant.export import packing
from tfquant.export.packed_file import (FloatTensor, PackedFileError, QuantizedTensor, accounted_bits,
                                        write_packed_model)
from tfquant.export.packed_reader import read_packed_model

METADATA = {"model": "resnet_20", "input_shape": [32, 32, 3], "bits": {"default": 4},
            "report": {"quantized": 20, "float": 77, "top1": 0.9123}}


def _quantized(rng, name, shape, bits, layout, axes=None, bucket=None):
    codes = rng.integers(0, 1 << bits, size=shape)
    groups = packing.num_groups(shape, layout, axes, bucket)
    alpha = rng.uniform(0.01, 2.0, size=groups).astype(np.float32)
    beta = rng.uniform(-1.0, 0.0, size=groups).astype(np.float32)
    return QuantizedTensor(name, shape, bits, layout, axes, bucket, codes, alpha, beta)


def _mixed_model(seed=0):
    rng = np.random.default_rng(seed)
    tensors = [
        _quantized(rng, "conv0/kernel", (3, 3, 3, 16), 1, "channel", (3,)),
        _quantized(rng, "dw/depthwise_kernel", (3, 3, 2, 4), 2, "channel", (2, 3)),
        _quantized(rng, "conv1/kernel", (3, 3, 16, 16), 3, "none"),
        _quantized(rng, "conv2/kernel", (3, 3, 16, 8), 4, "split", bucket=37),
        _quantized(rng, "fc/weights", (64, 10), 5, "channel", (1,)),
        _quantized(rng, "fc_t/weights", (10, 7), 6, "channel", (0,)),
        _quantized(rng, "odd/kernel", (5, 7), 7, "split", bucket=4),
        _quantized(rng, "conv3/kernel", (1, 1, 9, 9), 8, "none"),
        _quantized(rng, "wide/kernel", (13,), 16, "split", bucket=13),
        FloatTensor("bn/gamma", rng.standard_normal(16).astype(np.float32)),
        FloatTensor("fc/bias", rng.standard_normal(10).astype(np.float32)),
        FloatTensor("scalar", np.float32(3.5)),
        FloatTensor("empty", np.zeros((0, 4), np.float32)),
        FloatTensor("global_step", np.array(123456789012, dtype=np.int64)),
        FloatTensor("counts", np.arange(5, dtype=np.int32)),
    ]
    # Extreme codes in every quantized tensor.
    for t in tensors:
        if isinstance(t, QuantizedTensor):
            t.codes.reshape(-1)[:2] = [0, (1 << t.bits) - 1]
    return tensors


def _resnet20_like(bits, layout="channel"):
    rng = np.random.default_rng(bits)
    shapes = [(3, 3, 3, 16)] + [(3, 3, 16, 16)] * 6 + [(3, 3, 16, 32)] + [(3, 3, 32, 32)] * 5 \
        + [(3, 3, 32, 64)] + [(3, 3, 64, 64)] * 5
    assert len(shapes) == 19
    tensors = []
    for i, shape in enumerate(shapes):
        axes = (3,) if layout == "channel" else None
        bucket = 64 if layout == "split" else None
        tensors.append(_quantized(rng, f"resnet_model/stage_{i // 6}/unit_{i}/conv/kernel", shape, bits,
                                  layout, axes, bucket))
        for var in ("gamma", "beta", "moving_mean", "moving_variance"):
            tensors.append(FloatTensor(f"resnet_model/stage_{i // 6}/unit_{i}/bn/{var}",
                                       rng.standard_normal(shape[3]).astype(np.float32)))
    tensors.append(_quantized(rng, "resnet_model/dense/kernel", (64, 10), bits, layout,
                              (1,) if layout == "channel" else None, 64 if layout == "split" else None))
    tensors.append(FloatTensor("resnet_model/dense/bias", np.zeros(10, np.float32)))
    return tensors


def _assert_same(a_list, b_list):
    assert [t.name for t in a_list] == [t.name for t in b_list]
    for a, b in zip(a_list, b_list):
        assert type(a) is type(b)
        if isinstance(a, QuantizedTensor):
            assert (a.shape, a.bits, a.layout, a.channel_axes, a.bucket_size) == \
                (b.shape, b.bits, b.layout, b.channel_axes, b.bucket_size)
            assert np.array_equal(a.codes, b.codes) and b.codes.shape == a.shape
            assert np.array_equal(a.alpha.view(np.uint32), b.alpha.view(np.uint32))
            assert np.array_equal(a.beta.view(np.uint32), b.beta.view(np.uint32))
            assert np.array_equal(a.dequantize().view(np.uint32), b.dequantize().view(np.uint32))
        else:
            assert a.array.dtype == b.array.dtype and a.array.shape == b.array.shape
            assert a.array.tobytes() == b.array.tobytes()


def test_round_trip_mixed_model(tmp_path):
    tensors = _mixed_model()
    path = tmp_path / "model.tfq"
    written = write_packed_model(path, tensors, METADATA)
    assert written == os.path.getsize(path)
    got, metadata = read_packed_model(path)
    _assert_same(tensors, got)
    assert metadata == METADATA
    assert sorted(os.listdir(tmp_path)) == ["model.tfq"]
    # Arrays handed back are the caller's to modify.
    got[0].codes[0, 0, 0, 0] = 0
    got[-1].array[0] = 7


def test_round_trip_str_path_and_empty_model(tmp_path):
    path = str(tmp_path / "empty.tfq")
    write_packed_model(path, [], {})
    assert read_packed_model(path) == ([], {})


def test_round_trip_special_float_values(tmp_path):
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4028235e38], dtype=np.float32)
    finite = np.array([-0.0, 1e-45, 1.0, 3.4028235e38, 0.5, 2.0], dtype=np.float32)
    t = QuantizedTensor("q", (6,), 2, "split", None, 1, [0, 1, 2, 3, 0, 3], finite, np.zeros(6, np.float32))
    path = tmp_path / "m.tfq"
    write_packed_model(path, [t, FloatTensor("f", special)], {"note": "ü"})
    (q, f), meta = read_packed_model(path)
    assert np.array_equal(q.alpha.view(np.uint32), finite.view(np.uint32))
    assert np.array_equal(f.array.view(np.uint32), special.view(np.uint32))
    assert meta == {"note": "ü"}


@pytest.mark.parametrize("alpha,beta", [(np.nan, 0.0), (1.0, np.inf), (-np.inf, 0.0), (3e38, 3e38)])
def test_non_finite_ranges_refused(alpha, beta):
    with pytest.raises(ValueError, match="finite"):
        QuantizedTensor("q", (2,), 2, "none", None, None, [0, 3], [alpha], [beta])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["channel", "split", "none"])
def test_size_bound_resnet20_like(tmp_path, bits, layout):
    tensors = _resnet20_like(bits, layout)
    assert sum(isinstance(t, FloatTensor) for t in tensors) == 77
    path = tmp_path / "resnet20.tfq"
    size = write_packed_model(path, tensors, METADATA)
    assert size == os.path.getsize(path)
    assert size <= 1.02 * accounted_bits(tensors) / 8 + 4096
    _assert_same(tensors, read_packed_model(path)[0])


def test_size_overhead_is_small(tmp_path):
    # A tighter check than the bound: header, index and checksum of a ResNet-20 stay well under 4 KiB.
    tensors = _resnet20_like(4)
    size = write_packed_model(tmp_path / "m.tfq", tensors, METADATA)
    assert size - accounted_bits(tensors) / 8 < 2500


def test_accounted_bits():
    q = QuantizedTensor("q", (3, 3, 2, 4), 3, "channel", (2, 3), None, np.zeros(72, np.uint8),
                        np.ones(8), np.zeros(8))
    f = FloatTensor("f", np.zeros(10, np.float32))
    assert accounted_bits([q, f]) == 72 * 3 + 64 * 8 + 32 * 10


def test_tensor_validation():
    with pytest.raises(ValueError, match="groups"):
        QuantizedTensor("q", (4, 3), 2, "channel", (1,), None, np.zeros(12, int), [1.0], [0.0])
    with pytest.raises(ValueError, match="<= 3"):
        QuantizedTensor("q", (2,), 2, "none", None, None, [0, 4], [1.0], [0.0])
    with pytest.raises(ValueError, match="codes"):
        QuantizedTensor("q", (2, 2), 2, "none", None, None, [0, 1, 2], [1.0], [0.0])
    with pytest.raises(ValueError, match="bits"):
        QuantizedTensor("q", (2,), 17, "none", None, None, [0, 1], [1.0], [0.0])
    with pytest.raises(ValueError, match="dtype"):
        FloatTensor("f", np.array(["x"]))
    assert FloatTensor("f", np.ones(3)).array.dtype == np.float32
    t = QuantizedTensor("q", (4, 3), 2, "channel", [-1], 99, np.zeros((12,), int), np.ones(3), np.ones(3))
    assert (t.channel_axes, t.bucket_size, t.codes.shape, t.codes.dtype) == ((1,), None, (4, 3), np.uint16)


def test_write_rejects_duplicates_and_bad_metadata(tmp_path):
    path = tmp_path / "m.tfq"
    f = FloatTensor("x", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="duplicate"):
        write_packed_model(path, [f, FloatTensor("x", np.ones(1, np.float32))], {})
    with pytest.raises(ValueError, match="JSON"):
        write_packed_model(path, [f], {"bad": object()})
    assert os.listdir(tmp_path) == []


# ----- corruption and truncation -----

@pytest.fixture
def written_file(tmp_path):
    path = tmp_path / "model.tfq"
    write_packed_model(path, _mixed_model(), METADATA)
    return path


def _assert_rejected(path, *fragments):
    with pytest.raises(PackedFileError) as info:
        read_packed_model(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert isinstance(info.value, ValueError)
    return message


@pytest.mark.parametrize("keep", [0, 5, 8, 23, 24, 40, 200, 0.5, -33, -32, -1])
def test_truncation_detected(written_file, keep):
    data = written_file.read_bytes()
    if isinstance(keep, float):
        keep = int(len(data) * keep)
    elif keep < 0:
        keep = len(data) + keep
    written_file.write_bytes(data[:keep])
    message = _assert_rejected(written_file)
    if keep >= 24:
        assert "truncated" in message


def test_corruption_detected_everywhere(written_file):
    data = written_file.read_bytes()
    index_len = int.from_bytes(data[12:16], "little")
    payload_start = -(-(24 + index_len) // 8) * 8
    offsets = {
        "magic": 3, "version": 8, "flags": 10, "index_len": 12, "payload_len": 20,
        "index": 24 + index_len // 2, "index_end": 24 + index_len - 1,
        "payload_start": payload_start, "payload_mid": (payload_start + len(data) - 32) // 2,
        "payload_end": len(data) - 33, "checksum": len(data) - 32, "checksum_end": len(data) - 1,
    }
    for where, offset in offsets.items():
        for flip in (0x01, 0x80):
            corrupted = bytearray(data)
            corrupted[offset] ^= flip
            written_file.write_bytes(bytes(corrupted))
            with pytest.raises(PackedFileError, match=str(written_file).replace("\\", "\\\\")):
                read_packed_model(written_file)
    written_file.write_bytes(data)
    read_packed_model(written_file)


def test_checksum_message(written_file):
    data = bytearray(written_file.read_bytes())
    data[-100] ^= 0xFF
    written_file.write_bytes(bytes(data))
    _assert_rejected(written_file, "checksum mismatch", "sha256")


def test_trailing_data_detected(written_file):
    written_file.write_bytes(written_file.read_bytes() + b"\x00")
    _assert_rejected(written_file, "trailing")


def test_wrong_magic_missing_and_empty(tmp_path):
    other = tmp_path / "model.h5"
    other.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    _assert_rejected(other, "not a tfquant packed model", "magic")
    empty = tmp_path / "empty.tfq"
    empty.write_bytes(b"")
    _assert_rejected(empty, "magic")
    _assert_rejected(tmp_path / "missing.tfq", "cannot be read", "No such file")
    _assert_rejected(tmp_path, "is a directory", "expected a regular file")


def test_unsupported_version(written_file):
    data = bytearray(written_file.read_bytes())
    data[8] = 2
    written_file.write_bytes(bytes(data))
    _assert_rejected(written_file, "version 2")


def _rewrite(path, mutate_index):
    """Re-emit a file with an edited index and a valid checksum, as a buggy writer might."""
    import hashlib
    import struct
    import zlib
    data = path.read_bytes()
    index_len = int.from_bytes(data[12:16], "little")
    payload_start = -(-(24 + index_len) // 8) * 8
    index = json.loads(zlib.decompress(data[24:24 + index_len]))
    payload = data[payload_start:-32]
    mutate_index(index)
    new_index = zlib.compress(json.dumps(index).encode())
    body = struct.pack("<8sHHIQ", b"TFQPACK\x00", 1, 0, len(new_index), len(payload)) + new_index
    body += bytes(-len(body) % 8) + payload
    path.write_bytes(body + hashlib.sha256(body).digest())


@pytest.mark.parametrize("mutate,fragment", [
    (lambda ix: ix["t"][0].__setitem__("o", 10**9), "outside"),
    (lambda ix: ix["t"][-1].__setitem__("o", -4), "outside"),
    (lambda ix: ix["t"][0].__setitem__("q", 0), "bits"),
    (lambda ix: ix["t"][0].__setitem__("l", "rows"), "layout"),
    (lambda ix: ix["t"][0].__setitem__("a", [7]), "axis"),
    (lambda ix: ix["t"][-1].__setitem__("d", "<f8"), "dtype"),
    (lambda ix: ix["t"][1].__setitem__("n", ix["t"][0]["n"]), "duplicate"),
    (lambda ix: ix["t"][1].pop("s"), "'s'"),
    (lambda ix: ix.pop("m"), "metadata"),
])
def test_inconsistent_index_detected(written_file, mutate, fragment):
    _rewrite(written_file, mutate)
    _assert_rejected(written_file, "corrupt index", fragment)


def test_rewrite_helper_round_trips(written_file):
    _rewrite(written_file, lambda ix: None)
    _assert_same(_mixed_model(), read_packed_model(written_file)[0])


# ----- atomic writes -----

def _failing_model():
    tensors = _mixed_model()
    # The dataclass validated these codes on construction; corrupting them afterwards makes the
    # writer fail while streaming the payload, after the header and index are on disk.
    tensors[4].codes = tensors[4].codes.astype(np.int64) + 1000
    return tensors


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "model.tfq"
    with pytest.raises(ValueError, match="fc/weights"):
        write_packed_model(path, _failing_model(), METADATA)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_existing_file(tmp_path):
    path = tmp_path / "model.tfq"
    write_packed_model(path, _mixed_model(seed=5), {"version": "old"})
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_packed_model(path, _failing_model(), METADATA)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.tfq"]
    assert read_packed_model(path)[1] == {"version": "old"}


def test_interrupted_write_cleans_up(tmp_path, monkeypatch):
    from tfquant.export import packed_file

    calls = []

    def exploding_pack(codes, bits):
        calls.append(bits)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return packing.pack_codes(codes, bits)

    monkeypatch.setattr(packed_file.packing, "pack_codes", exploding_pack)
    path = tmp_path / "model.tfq"
    path.write_bytes(b"previous contents")
    with pytest.raises(KeyboardInterrupt):
        write_packed_model(path, _mixed_model(), METADATA)
    assert path.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["model.tfq"]


def test_overwrite_replaces_file(tmp_path):
    path = tmp_path / "model.tfq"
    path.write_bytes(b"stale")
    write_packed_model(path, _mixed_model(), METADATA)
    _assert_same(_mixed_model(), read_packed_model(path)[0])
