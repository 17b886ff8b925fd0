"""Fashion-MNIST reader: the real files, and malformed copies written to tmp_path."""

import gzip
import os
import shutil
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from nets.data import fmnist
from nets.errors import DataError

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST_DIR),
                                  reason='Fashion-MNIST not installed at ' + FMNIST_DIR)

NAMES = ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
         't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz']


def _write_idx(path, magic, dims, payload, compress=True):
    raw = struct.pack('>I', magic) + struct.pack('>%dI' % len(dims), *dims) + bytes(payload)
    opener = gzip.open if compress else open
    with opener(path, 'wb') as f:
        f.write(raw)


def _write_small_set(d, n_train=6, n_test=4):
    rng = np.random.RandomState(0)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        _write_idx(os.path.join(d, prefix + '-images-idx3-ubyte.gz'), 2051, (n, 28, 28),
                   rng.randint(0, 256, n * 784).astype(np.uint8).tobytes())
        _write_idx(os.path.join(d, prefix + '-labels-idx1-ubyte.gz'), 2049, (n,),
                   (np.arange(n) % 10).astype(np.uint8).tobytes())


def _assert_one_line_naming(exc_info, path):
    msg = str(exc_info.value)
    assert '\n' not in msg
    assert str(path) in msg
    assert exc_info.value.path in (str(path), None) or exc_info.value.path == os.path.dirname(str(path))


def _gzip_stream(raw, level=9):
    packer = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(raw) + packer.flush()


def _peak_bytes_while(fn):
    """(exception raised by fn, peak bytes traced while it ran)."""
    tracemalloc.start()
    try:
        fn()
    except DataError as exc:
        return exc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    raise AssertionError('no DataError raised')


@needs_fmnist
def test_real_files_shapes_and_labels():
    data = fmnist.load_fmnist(FMNIST_DIR)
    assert data['train_images'].shape == (60000, 28, 28)
    assert data['test_images'].shape == (10000, 28, 28)
    assert data['train_images'].dtype == np.uint8
    assert data['train_labels'].shape == (60000,)
    assert data['test_labels'].shape == (10000,)
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    assert np.bincount(data['train_labels'], minlength=10).tolist() == [6000] * 10
    assert np.bincount(data['test_labels'], minlength=10).tolist() == [1000] * 10
    assert abs(data['train_images'].mean() / 255.0 - 0.2860) < 1e-3


def test_small_valid_set_loads(tmp_path):
    _write_small_set(str(tmp_path))
    data = fmnist.load_fmnist(str(tmp_path))
    assert data['train_images'].shape == (6, 28, 28)
    assert data['test_labels'].tolist() == [0, 1, 2, 3]


def test_missing_dir(tmp_path):
    missing = tmp_path / 'nope'
    with pytest.raises(DataError) as exc_info:
        fmnist.validate_fmnist_dir(str(missing))
    _assert_one_line_naming(exc_info, missing)


def test_missing_file(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 't10k-labels-idx1-ubyte.gz'
    victim.unlink()
    with pytest.raises(DataError) as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)
    assert 'missing' in str(exc_info.value)


def test_truncated_payload(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 'train-images-idx3-ubyte.gz'
    _write_idx(str(victim), 2051, (6, 28, 28), bytes(6 * 784 - 10))
    with pytest.raises(DataError) as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)
    assert 'expected 4704 data bytes' in str(exc_info.value)


def test_truncated_gzip_stream(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 'train-images-idx3-ubyte.gz'
    blob = victim.read_bytes()
    victim.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(DataError) as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)


def test_wrong_magic(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 'train-images-idx3-ubyte.gz'
    # A labels file where the images file should be.
    shutil.copy(str(tmp_path / 'train-labels-idx1-ubyte.gz'), str(victim))
    with pytest.raises(DataError) as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)
    assert 'expected IDX magic 2051 (images), found 2049' in str(exc_info.value)


def test_not_gzip(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 'train-labels-idx1-ubyte.gz'
    _write_idx(str(victim), 2049, (6,), bytes(6), compress=False)
    with pytest.raises(DataError) as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)
    assert 'gzip' in str(exc_info.value)


def test_wrong_image_dims(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 't10k-images-idx3-ubyte.gz'
    _write_idx(str(victim), 2051, (4, 32, 32), bytes(4 * 1024))
    with pytest.raises(DataError) as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)
    assert '28x28' in str(exc_info.value)


def test_label_count_mismatch(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 'train-labels-idx1-ubyte.gz'
    _write_idx(str(victim), 2049, (5,), bytes(5))
    with pytest.raises(DataError, match='expected 6 labels to match the 6 images of .*header says 5') as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)
    assert exc_info.value.path == str(victim)


def test_label_out_of_range(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 'train-labels-idx1-ubyte.gz'
    _write_idx(str(victim), 2049, (6,), bytes([0, 1, 2, 12, 4, 5]))
    with pytest.raises(DataError) as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)
    assert 'found 12 at index 3' in str(exc_info.value)


def test_fifo_is_refused_without_blocking(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 'train-labels-idx1-ubyte.gz'
    victim.unlink()
    os.mkfifo(str(victim))  # nobody writes to it: opening it for reading would block forever
    with pytest.raises(DataError, match='is a FIFO; expected a regular file') as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)
    assert exc_info.value.path == str(victim)


def test_directory_in_place_of_a_file(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 't10k-images-idx3-ubyte.gz'
    victim.unlink()
    victim.mkdir()
    with pytest.raises(DataError, match='is a directory') as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)


@pytest.mark.skipif(os.geteuid() == 0, reason='root reads files whatever their mode')
def test_unreadable_file(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 'train-images-idx3-ubyte.gz'
    victim.chmod(0)
    with pytest.raises(DataError, match='Permission denied') as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)


def test_gzip_bomb_is_refused_after_the_promised_size(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 'train-labels-idx1-ubyte.gz'
    # The header promises 6 labels; the stream goes on with 64 MB of zeros (a 64 KB file).
    raw = struct.pack('>II', 2049, 6) + bytes(6) + bytes(64 << 20)
    victim.write_bytes(_gzip_stream(raw))
    exc, peak = _peak_bytes_while(lambda: fmnist.load_fmnist(str(tmp_path)))
    assert str(victim) in str(exc) and 'decompresses to more than 14 bytes' in str(exc)
    assert peak < 4 << 20, peak  # inflated in bounded chunks, never the whole 64 MB


def test_payload_longer_than_the_header_promises(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 't10k-labels-idx1-ubyte.gz'
    _write_idx(str(victim), 2049, (4,), bytes(5))
    with pytest.raises(DataError, match='decompresses to more than 12 bytes') as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)


def test_trailing_data_after_the_stream(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 't10k-labels-idx1-ubyte.gz'
    victim.write_bytes(victim.read_bytes() + b'junk')
    with pytest.raises(DataError, match='4 bytes of trailing data') as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)


@pytest.mark.parametrize('name, magic, dims, expected', [
    # 2^32 - 1 labels in a tiny file: deflate cannot expand a few dozen bytes to 4 GB.
    ('train-labels-idx1-ubyte.gz', 2049, (2 ** 32 - 1,), 'header promises 4294967295 data bytes'),
    # 2^32 - 1 images: over the absolute cap whatever the file size.
    ('train-images-idx3-ubyte.gz', 2051, (2 ** 32 - 1, 28, 28), 'expected at most 1073741824'),
])
def test_huge_header_counts_are_refused_before_allocating(tmp_path, name, magic, dims, expected):
    _write_small_set(str(tmp_path))
    victim = tmp_path / name
    _write_idx(str(victim), magic, dims, bytes(100))
    exc, peak = _peak_bytes_while(lambda: fmnist.load_fmnist(str(tmp_path)))
    assert str(victim) in str(exc) and expected in str(exc), str(exc)
    assert peak < 1 << 20, peak


def test_label_header_checked_against_images_before_inflating(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 'train-labels-idx1-ubyte.gz'
    # A plausible count for its size (a highly compressible 40 MB of zeros), but not the 6 images' count.
    _write_idx(str(victim), 2049, (40 << 20,), bytes(40 << 20))
    exc, peak = _peak_bytes_while(lambda: fmnist.load_fmnist(str(tmp_path)))
    assert str(victim) in str(exc) and 'expected 6 labels to match the 6 images' in str(exc)
    assert peak < 2 << 20, peak


def test_every_truncation_is_a_data_error(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 't10k-labels-idx1-ubyte.gz'
    blob = victim.read_bytes()
    for end in range(len(blob)):
        victim.write_bytes(blob[:end])
        with pytest.raises(DataError) as exc_info:
            fmnist.load_fmnist(str(tmp_path))
        _assert_one_line_naming(exc_info, victim)
