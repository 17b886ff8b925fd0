"""The 'block' range-group layout (per output channel, blocks of B input elements): grouping, codes, packing,
accounting and reload, against a NumPy brute force."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tfquant import ops, step_ops
from tfquant.export import packed_file, packed_reader, packing
from tfquant.layout import GroupLayout

tf1 = tf.compat.v1

CASES = [((40, 6), (1,), 16),          # Dense [K, N], K not a multiple of B: a shorter last block
         ((3, 3, 8, 5), (3,), 16),     # Conv2D HWIO: blocks of kernel positions x input channels
         ((6, 32), (0,), 16),          # MatMul with transpose_b: [N, K], channel axis first
         ((2, 2, 4, 3), (2, 3), 16)]   # depthwise: two channel axes


def _brute_groups(shape, axes, size):
    """Group of every element (C order) by the definition: column = channel coordinates row-major,
    row = the other coordinates row-major, group = (row // size) * N + column."""
    rest = [a for a in range(len(shape)) if a not in axes]
    columns = int(np.prod([shape[a] for a in axes]))
    out = []
    for index in np.ndindex(*shape):
        column = int(np.ravel_multi_index([index[a] for a in axes], [shape[a] for a in axes]))
        row = int(np.ravel_multi_index([index[a] for a in rest], [shape[a] for a in rest])) if rest else 0
        out.append(row // size * columns + column)
    return np.array(out)


@pytest.mark.parametrize("shape,axes,size", CASES)
def test_group_index_and_count_match_the_definition(shape, axes, size):
    expected = _brute_groups(shape, axes, size)
    layout = GroupLayout("block", channel_axes=axes, bucket_size=size)
    assert layout.num_groups(shape) == expected.max() + 1
    np.testing.assert_array_equal(packing.group_index(shape, "block", axes, size), expected)
    assert layout.storage_bits(shape) == (expected.max() + 1) * 64


@pytest.mark.parametrize("shape,axes,size", CASES)
@pytest.mark.parametrize("grid", ["minmax", "symmetric"])
def test_codes_quantize_and_pack_round_trip(shape, axes, size, grid, tmp_path):
    rng = np.random.default_rng(0)
    value = rng.normal(size=shape).astype(np.float32)
    layout = GroupLayout("block", channel_axes=axes, bucket_size=size)
    bits = 3
    with tf.Graph().as_default():
        x = tf.constant(value)
        if grid == "symmetric":
            quantized = step_ops.quantize_weight_symmetric(x, bits, layout)
            codes, alpha, beta = step_ops.symmetric_weight_codes(x, bits, layout)
        else:
            quantized = ops.quantize_weight(x, bits, layout)
            codes, alpha, beta = ops.weight_codes(x, bits, layout)
        with tf1.Session() as sess:
            quantized, codes, alpha, beta = sess.run([quantized, codes, alpha, beta])
    groups = _brute_groups(shape, axes, size)
    flat = value.reshape(-1)
    # Each group's range is its own min/max (or max |w|): the brute-force grouping decides every element.
    for g in range(groups.max() + 1):
        members = flat[groups == g]
        if grid == "minmax":
            assert beta[g] == members.min()
        else:
            assert np.isclose(alpha[g] * np.float32(1 / 7) * 3, np.abs(members).max(), rtol=1e-6)
    decoded = packing.dequantize(codes, bits, alpha, beta, shape, "block", axes, size)
    np.testing.assert_array_equal(decoded, quantized)
    tensor = packed_file.QuantizedTensor("w", shape, bits, "block", axes, size, codes, alpha, beta)
    path = tmp_path / "m.tfq"
    packed_file.write_packed_model(str(path), [tensor], {})
    (read,), _ = packed_reader.read_packed_model(str(path))
    assert (read.layout, read.bucket_size, tuple(read.channel_axes)) == ("block", size, tuple(sorted(axes)))
    np.testing.assert_array_equal(read.codes, codes)
    np.testing.assert_array_equal(read.dequantize(), quantized)


def test_config_refuses_block_sizes_the_kernels_do_not_take():
    for size in (8, 24, 100):
        with pytest.raises(ValueError, match="power of 2 >= 16"):
            tfquant.QuantConfig(use_buckets=True, bucket_type="block", bucket_size=size)
    assert tfquant.QuantConfig(use_buckets=True, bucket_type="block", bucket_size=32).bucket_size == 32


def test_quantize_graph_reports_block_layers_and_their_storage():
    with tf.Graph().as_default() as graph:
        images = tf1.placeholder(tf.float32, [None, 40])
        kernel = tf1.get_variable("dense/kernel", [40, 6])
        tf.matmul(images, kernel, name="dense/MatMul")
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(
            weight_bits=4, use_buckets=True, bucket_type="block", bucket_size=16, quantize_all_layers=True),
            is_training=False)
    (layer,) = [l for l in report.weight_layers if l.quantized]
    assert (layer.bucket_type, layer.bucket_size, layer.channel_axes) == ("block", 16, [1])
    assert layer.num_groups == 3 * 6  # ceil(40 / 16) blocks x 6 columns
    assert layer.weight_storage_bits == 40 * 6 * 4 and layer.bucket_storage_bits == 18 * 64
    assert "block/16" in report.format_table()
    reloaded = type(report).from_dict(report.to_dict())
    assert reloaded.weight_layers[0].num_groups == 18
