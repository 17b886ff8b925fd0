"""Fashion-MNIST reader: the real files, and malformed copies written to tmp_path."""

import gzip
import os
import shutil
import struct

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
    with pytest.raises(DataError) as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)


def test_label_out_of_range(tmp_path):
    _write_small_set(str(tmp_path))
    victim = tmp_path / 'train-labels-idx1-ubyte.gz'
    _write_idx(str(victim), 2049, (6,), bytes([0, 1, 2, 12, 4, 5]))
    with pytest.raises(DataError) as exc_info:
        fmnist.load_fmnist(str(tmp_path))
    _assert_one_line_naming(exc_info, victim)
    assert 'found 12 at index 3' in str(exc_info.value)
