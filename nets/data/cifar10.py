"""Reader for the CIFAR-10 binary release (data_batch_1.bin .. data_batch_5.bin, test_batch.bin)."""

import os

import numpy as np

from nets.errors import DataError

NB_CLASSES = 10
IMAGE_SIZE = 32
NB_CHANNELS = 3
RECORD_BYTES = 1 + IMAGE_SIZE * IMAGE_SIZE * NB_CHANNELS  # 3073: label byte + CHW pixels
RECORDS_PER_FILE = 10000  # in the official release; smaller files are accepted

TRAIN_FILES = tuple('data_batch_%d.bin' % i for i in range(1, 6))
TEST_FILES = ('test_batch.bin',)


def _fail(path, what):
    raise DataError('CIFAR-10 file %s: %s' % (path, what))


def _check_dir(data_dir):
    if data_dir is None or not os.path.isdir(data_dir):
        raise DataError('CIFAR-10 directory %s: expected a directory holding the binary release '
                        '(%s), but it is missing or not a directory'
                        % (data_dir, ', '.join(TRAIN_FILES + TEST_FILES)))


def _check_size(path):
    if not os.path.isfile(path):
        _fail(path, 'expected this file to exist, but it is missing')
    size = os.path.getsize(path)
    if size == 0 or size % RECORD_BYTES:
        _fail(path, 'expected a positive multiple of %d bytes (%d for the official %d-record '
              'file), found %d bytes' % (RECORD_BYTES, RECORD_BYTES * RECORDS_PER_FILE,
                                         RECORDS_PER_FILE, size))
    return size // RECORD_BYTES


def _read_records(path):
    """Returns (images uint8 [N,32,32,3], labels int64 [N]) from one .bin file."""
    _check_size(path)
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = raw[:, 0]
    bad = np.flatnonzero(labels >= NB_CLASSES)
    if bad.size:
        _fail(path, 'expected labels in 0..%d, found %d in record %d'
              % (NB_CLASSES - 1, int(labels[bad[0]]), int(bad[0])))
    # The file stores each image as three 32x32 planes (R, G, B); the models want HWC.
    images = raw[:, 1:].reshape(-1, NB_CHANNELS, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def validate_cifar10_dir(data_dir):
    """Checks that data_dir holds the six CIFAR-10 .bin files with plausible sizes.

    Only file presence and sizes are checked (labels are checked on loading).
    Args:
      data_dir: directory of the CIFAR-10 binary release.
    Returns:
      dict mapping each file name to its number of records.
    Raises:
      DataError: if the directory or a file is missing or has a bad size.
    """
    _check_dir(data_dir)
    return {name: _check_size(os.path.join(data_dir, name)) for name in TRAIN_FILES + TEST_FILES}


def load_cifar10(data_dir):
    """Loads the CIFAR-10 binary release into memory after validating it.

    Args:
      data_dir: directory of the CIFAR-10 binary release.
    Returns:
      dict: 'train_images' uint8 [N,32,32,3], 'train_labels' int64 [N],
        'test_images', 'test_labels' likewise.
    Raises:
      DataError: if a file is missing, has a bad size or holds a label outside 0..9.
    """
    validate_cifar10_dir(data_dir)
    out = {}
    for split, names in (('train', TRAIN_FILES), ('test', TEST_FILES)):
        parts = [_read_records(os.path.join(data_dir, name)) for name in names]
        out[split + '_images'] = np.concatenate([p[0] for p in parts])
        out[split + '_labels'] = np.concatenate([p[1] for p in parts])
    return out
