"""Tests for tfquant.export.packing: bit packing, group layouts and exact float32 dequantization."""
import struct
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tfquant.export import packing
from tfquant.export.packing import dequantize, group_index, num_groups, pack_codes, unpack_codes


def _random_codes(rng, bits, count):
    codes = rng.integers(0, 1 << bits, size=count, dtype=np.int64)
    if count >= 2:
        # The extremes are where a dropped high bit or a sign bug shows up.
        codes[0] = 0
        codes[-1] = (1 << bits) - 1
    return codes


def _reference_pack(codes, bits):
    """Bit order by definition: the little-endian bytes of sum(c_i << (i*k))."""
    value = 0
    for i, c in enumerate(codes):
        value |= int(c) << (i * bits)
    return value.to_bytes((len(codes) * bits + 7) // 8, "little")


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("count", [0, 1, 7, 9, 1000003])
def test_round_trip_every_width(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    codes = _random_codes(rng, bits, count)
    data = pack_codes(codes, bits)
    assert isinstance(data, bytes)
    assert len(data) == (count * bits + 7) // 8
    out = unpack_codes(data, bits, count)
    assert out.dtype == np.uint16 and out.shape == (count,)
    assert np.array_equal(out, codes)


@pytest.mark.parametrize("bits", range(1, 17))
def test_all_codes_present_round_trip(bits):
    codes = np.arange(1 << bits) if bits <= 12 else np.r_[0:5000, (1 << bits) - 5000:(1 << bits)]
    assert np.array_equal(unpack_codes(pack_codes(codes, bits), bits, codes.size), codes)


@pytest.mark.parametrize("bits", range(1, 17))
def test_matches_integer_reference(bits):
    rng = np.random.default_rng(bits)
    for count in (1, 3, 8, 13, 64):
        codes = _random_codes(rng, bits, count)
        assert pack_codes(codes, bits) == _reference_pack(codes, bits)


@given(bits=st.integers(1, 16), data=st.data())
@settings(max_examples=200, deadline=None)
def test_round_trip_property(bits, data):
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=50))
    packed = pack_codes(np.array(codes, dtype=np.int64), bits)
    assert packed == _reference_pack(codes, bits)
    assert unpack_codes(packed, bits, len(codes)).tolist() == codes


def test_byte_lengths():
    assert len(pack_codes(np.zeros(4, np.uint8), 2)) == 1
    assert len(pack_codes(np.zeros(5, np.uint8), 2)) == 2
    assert len(pack_codes(np.zeros(8, np.uint8), 3)) == 3
    assert len(pack_codes(np.zeros(9, np.uint8), 3)) == 4
    assert len(pack_codes(np.zeros(10, np.uint8), 8)) == 10
    assert len(pack_codes(np.zeros(10, np.uint16), 16)) == 20
    assert pack_codes([], 5) == b""


def test_hand_computed_three_bit_example():
    # Each code written least significant bit first, codes one after another:
    #   1->100 2->010 3->110 4->001 5->101 6->011 7->111 0->000
    # stream 10001011 00011010 11111000, each byte's first listed bit being its bit 0:
    #   byte0 = 1+16+64+128 = 0xD1, byte1 = 8+16+64 = 0x58, byte2 = 1+2+4+8+16 = 0x1F.
    assert pack_codes([1, 2, 3, 4, 5, 6, 7, 0], 3) == bytes([0xD1, 0x58, 0x1F])
    assert unpack_codes(bytes([0xD1, 0x58, 0x1F]), 3, 8).tolist() == [1, 2, 3, 4, 5, 6, 7, 0]


def test_hand_computed_small_examples():
    # k=2: first code in the two lowest bits.
    assert pack_codes([1, 2, 3, 0, 3], 2) == bytes([0b00111001, 0b00000011])
    # k=16: little-endian uint16 per code.
    assert pack_codes([0x1234, 0xFFFF], 16) == bytes([0x34, 0x12, 0xFF, 0xFF])
    # k=12: two codes in three bytes, 0xABC then 0x123 -> 0x123ABC little-endian.
    assert pack_codes([0xABC, 0x123], 12) == bytes([0xBC, 0x3A, 0x12])
    # k=1: the first code is bit 0 of the first byte.
    assert pack_codes([1, 0, 0, 0, 0, 0, 0, 0, 1], 1) == bytes([0x01, 0x01])


def test_unpack_accepts_bytes_like_and_ignores_extra():
    data = pack_codes([5, 6, 7], 4) + b"\xff\xff"
    for buf in (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert unpack_codes(buf, 4, 3).tolist() == [5, 6, 7]


def test_unpack_result_is_writable():
    out = unpack_codes(pack_codes([1, 2], 8), 8, 2)
    out[0] = 9
    assert out[0] == 9


def test_pack_accepts_shaped_and_integral_float_codes():
    codes = np.arange(24).reshape(2, 3, 4) % 8
    assert pack_codes(codes, 3) == pack_codes(codes.reshape(-1), 3)
    assert pack_codes(codes.astype(np.float32), 3) == pack_codes(codes, 3)


@pytest.mark.parametrize("bits", [0, 17, -1, 2.0, True, None])
def test_bad_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_codes([0], bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(b"\x00\x00\x00", bits, 1)


@pytest.mark.parametrize("bits", [1, 3, 8, 9, 16])
def test_out_of_range_codes_rejected(bits):
    with pytest.raises(ValueError, match=str(1 << bits)):
        pack_codes([0, 1 << bits], bits)
    with pytest.raises(ValueError, match="-1"):
        pack_codes([0, -1], bits)


def test_non_integer_codes_rejected():
    with pytest.raises(ValueError, match="integ"):
        pack_codes([0.5], 3)
    with pytest.raises(ValueError, match="integ"):
        pack_codes([np.nan], 3)
    with pytest.raises(ValueError, match="integ"):
        pack_codes(["a"], 3)


def test_unpack_short_data_rejected():
    with pytest.raises(ValueError, match="short"):
        unpack_codes(b"\x00\x00", 3, 8)
    with pytest.raises(ValueError, match="short"):
        unpack_codes(b"", 1, 1)


def test_speed_resnet110_scale():
    codes = np.random.default_rng(0).integers(0, 8, size=1_700_000)
    start = time.perf_counter()
    out = unpack_codes(pack_codes(codes, 3), 3, codes.size)
    elapsed = time.perf_counter() - start
    assert np.array_equal(out, codes)
    # Generous against slow CI machines; the point is to catch a per-element Python loop.
    assert elapsed < 3.0


# ----- group layouts -----

def test_group_index_none():
    assert np.array_equal(group_index((3, 4), "none"), np.zeros(12))
    assert group_index((3, 4), "none").dtype == np.int64
    assert num_groups((3, 4), "none") == 1


def test_group_index_depthwise_channel():
    shape = (3, 3, 2, 4)
    expected = np.empty(shape, dtype=np.int64)
    for i in range(3):
        for j in range(3):
            for c in range(2):
                for m in range(4):
                    expected[i, j, c, m] = c * 4 + m
    got = group_index(shape, "channel", channel_axes=(2, 3))
    assert got.dtype == np.int64
    assert np.array_equal(got, expected.reshape(-1))
    assert num_groups(shape, "channel", channel_axes=(2, 3)) == 8
    assert np.array_equal(group_index(shape, "channel", channel_axes=(-2, -1)), got)


def test_group_index_conv_and_matmul_channel():
    conv = group_index((2, 2, 3, 5), "channel", channel_axes=(3,))
    assert np.array_equal(conv, np.tile(np.arange(5), 12))
    matmul = group_index((4, 3), "channel", channel_axes=(1,))
    assert matmul.tolist() == [0, 1, 2] * 4
    transposed = group_index((4, 3), "channel", channel_axes=(0,))
    assert transposed.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert num_groups((4, 3), "channel", channel_axes=(0,)) == 4
    assert num_groups((4, 3), "channel", channel_axes=3 - 2) == 3


def test_group_index_split():
    assert group_index((10,), "split", bucket_size=4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert num_groups((10,), "split", bucket_size=4) == 3
    assert num_groups((2, 4), "split", bucket_size=4) == 2
    assert group_index((2, 5), "split", bucket_size=4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert num_groups((0,), "split", bucket_size=4) == 0


def test_group_layout_errors():
    with pytest.raises(ValueError, match="layout"):
        group_index((3,), "rows")
    with pytest.raises(ValueError, match="channel_axes"):
        group_index((3, 4), "channel")
    with pytest.raises(ValueError, match="out of range"):
        group_index((3, 4), "channel", channel_axes=(2,))
    with pytest.raises(ValueError, match="increasing"):
        group_index((3, 4, 5), "channel", channel_axes=(2, 1))
    with pytest.raises(ValueError, match="increasing"):
        num_groups((3, 4, 5), "channel", channel_axes=(1, -2))
    for bad in (None, 0, -3, 2.5):
        with pytest.raises(ValueError, match="bucket_size"):
            num_groups((10,), "split", bucket_size=bad)


# ----- dequantization -----

def _f32(x):
    """Round a Python float to float32 without NumPy (double rounding of one +,*,/ on float32
    inputs through float64 is exact, so this gives correctly rounded float32 arithmetic)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _reference_dequantize(codes, bits, alpha, beta, groups_of_elements):
    # The graph's order: scale = alpha * float32(1 / levels); value = code * scale + beta.
    inverse_levels = _f32(1.0 / float((1 << bits) - 1))
    out = []
    for code, g in zip(codes, groups_of_elements):
        a, b = _f32(float(alpha[g])), _f32(float(beta[g]))
        scale = _f32(a * inverse_levels)
        out.append(_f32(_f32(_f32(float(code)) * scale) + b))
    return np.array(out, dtype=np.float32)


CASES = [
    ((3, 3, 2, 4), "channel", (2, 3), None),
    ((3, 3, 3, 5), "channel", (3,), None),
    ((6, 4), "channel", (0,), None),
    ((7, 5), "split", None, 4),
    ((11,), "none", None, None),
]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 13, 16])
@pytest.mark.parametrize("shape,layout,axes,bucket", CASES)
def test_dequantize_matches_float32_reference(bits, shape, layout, axes, bucket):
    rng = np.random.default_rng(bits)
    n = int(np.prod(shape))
    codes = _random_codes(rng, bits, n)
    groups = num_groups(shape, layout, axes, bucket)
    alpha = (rng.standard_normal(groups) * 0.37).astype(np.float32)
    beta = (rng.standard_normal(groups) * 0.11).astype(np.float32)
    got = dequantize(codes.reshape(shape), bits, alpha, beta, shape, layout, axes, bucket)
    assert got.dtype == np.float32 and got.shape == shape
    index = group_index(shape, layout, axes, bucket)
    expected = _reference_dequantize(codes, bits, alpha, beta, index).reshape(shape)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_dequantize_is_not_float64():
    # Find inputs where float32 step-by-step differs from float64-then-round, and check that the
    # float32 answer is the one returned.
    rng = np.random.default_rng(1)
    bits, n = 7, 5000
    codes = rng.integers(0, 128, size=n)
    alpha = rng.uniform(0.1, 3.0, size=n).astype(np.float32)
    beta = rng.uniform(-1.0, 1.0, size=n).astype(np.float32)
    got = dequantize(codes, bits, alpha, beta, (n,), "split", bucket_size=1)
    wide = (alpha.astype(np.float64) * (codes / 127.0) + beta.astype(np.float64)).astype(np.float32)
    differs = got != wide
    assert differs.any()
    expected = _reference_dequantize(codes[differs], bits, alpha[differs], beta[differs],
                                     range(int(differs.sum())))
    assert np.array_equal(got[differs], expected)


@given(bits=st.integers(1, 16), n=st.integers(1, 40), bucket=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_dequantize_split_property(bits, n, bucket, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, size=n)
    groups = -(-n // bucket)
    alpha = rng.standard_normal(groups).astype(np.float32)
    beta = rng.standard_normal(groups).astype(np.float32)
    got = dequantize(codes, bits, alpha, beta, (n,), "split", bucket_size=bucket)
    expected = _reference_dequantize(codes, bits, alpha, beta, [i // bucket for i in range(n)])
    assert np.array_equal(got, expected)


def test_dequantize_endpoints():
    got = dequantize([0, 15], 4, [2.5], [-1.25], (2,), "none")
    assert got.tolist() == [-1.25, 1.25]


def test_dequantize_errors():
    with pytest.raises(ValueError, match="groups"):
        dequantize([0, 1, 2, 3], 2, [1.0], [0.0], (2, 2), "channel", channel_axes=(1,))
    with pytest.raises(ValueError, match="codes"):
        dequantize([0, 1, 2], 2, [1.0], [0.0], (2, 2), "none")
    with pytest.raises(ValueError, match="<= 3"):
        dequantize([0, 1, 2, 4], 2, [1.0], [0.0], (2, 2), "none")


def test_packed_size():
    assert packing.packed_size(8, 3) == 3
    assert packing.packed_size(0, 16) == 0
    assert packing.packed_size(1, 1) == 1
