"""CIFAR-10 binary reader on files written by the test in the real 3073-byte record format."""

import os

import numpy as np
import pytest

from nets.data import cifar10
from nets.errors import DataError


def _write_bin(path, images_hwc, labels):
    # The release stores each record as a label byte then the R, G and B planes.
    chw = images_hwc.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    records = np.concatenate([np.asarray(labels, np.uint8)[:, None], chw], axis=1)
    records.astype(np.uint8).tofile(path)


def _write_release(d, n_per_file=3, seed=0):
    rng = np.random.RandomState(seed)
    written = {}
    for name in cifar10.TRAIN_FILES + cifar10.TEST_FILES:
        imgs = rng.randint(0, 256, (n_per_file, 32, 32, 3)).astype(np.uint8)
        lbls = rng.randint(0, 10, n_per_file)
        _write_bin(os.path.join(d, name), imgs, lbls)
        written[name] = (imgs, lbls)
    return written


def test_known_image_round_trip(tmp_path):
    written = _write_release(str(tmp_path))
    # Hand-built record: a red top-left pixel, a green pixel at (0,1), a blue one at (1,0).
    record = np.zeros(3073, np.uint8)
    record[0] = 7
    record[1 + 0] = 200                 # R plane, row 0 col 0
    record[1 + 1024 + 1] = 150          # G plane, row 0 col 1
    record[1 + 2048 + 32] = 100         # B plane, row 1 col 0
    record.tofile(str(tmp_path / 'test_batch.bin'))
    data = cifar10.load_cifar10(str(tmp_path))
    assert data['test_images'].shape == (1, 32, 32, 3)
    img = data['test_images'][0]
    assert img[0, 0].tolist() == [200, 0, 0]
    assert img[0, 1].tolist() == [0, 150, 0]
    assert img[1, 0].tolist() == [0, 0, 100]
    assert int(img.sum()) == 450
    assert data['test_labels'].tolist() == [7]
    assert data['train_images'].shape == (15, 32, 32, 3)
    expected = np.concatenate([written[n][0] for n in cifar10.TRAIN_FILES])
    np.testing.assert_array_equal(data['train_images'], expected)
    np.testing.assert_array_equal(
        data['train_labels'], np.concatenate([written[n][1] for n in cifar10.TRAIN_FILES]))


def test_missing_dir(tmp_path):
    with pytest.raises(DataError) as exc_info:
        cifar10.load_cifar10(str(tmp_path / 'absent'))
    assert str(tmp_path / 'absent') in str(exc_info.value)


def test_missing_file(tmp_path):
    _write_release(str(tmp_path))
    os.remove(str(tmp_path / 'data_batch_3.bin'))
    with pytest.raises(DataError) as exc_info:
        cifar10.validate_cifar10_dir(str(tmp_path))
    msg = str(exc_info.value)
    assert str(tmp_path / 'data_batch_3.bin') in msg and '\n' not in msg


def test_size_not_multiple_of_record(tmp_path):
    _write_release(str(tmp_path))
    victim = tmp_path / 'data_batch_2.bin'
    with open(str(victim), 'ab') as f:
        f.write(b'\x00' * 5)
    with pytest.raises(DataError) as exc_info:
        cifar10.load_cifar10(str(tmp_path))
    msg = str(exc_info.value)
    assert str(victim) in msg and '3073' in msg and str(3 * 3073 + 5) in msg


def test_empty_file(tmp_path):
    _write_release(str(tmp_path))
    (tmp_path / 'test_batch.bin').write_bytes(b'')
    with pytest.raises(DataError, match='positive multiple of 3073'):
        cifar10.load_cifar10(str(tmp_path))


def test_label_out_of_range(tmp_path):
    _write_release(str(tmp_path))
    victim = tmp_path / 'data_batch_5.bin'
    _write_bin(str(victim), np.zeros((2, 32, 32, 3), np.uint8), [3, 11])
    with pytest.raises(DataError) as exc_info:
        cifar10.load_cifar10(str(tmp_path))
    msg = str(exc_info.value)
    assert str(victim) in msg and 'found 11 in record 1' in msg
