"""Reader for the Fashion-MNIST IDX files (gzip-compressed, as distributed)."""

import gzip
import os
import struct
import zlib

import numpy as np

from nets.errors import DataError

DEFAULT_DATA_DIR = '/usr/share/datasets/fashion-mnist'
NB_CLASSES = 10
IMAGE_SIZE = 28

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049

# (key, file name, kind) for every file the data set must contain.
_FILES = (
    ('train_images', 'train-images-idx3-ubyte.gz', 'images'),
    ('train_labels', 'train-labels-idx1-ubyte.gz', 'labels'),
    ('test_images', 't10k-images-idx3-ubyte.gz', 'images'),
    ('test_labels', 't10k-labels-idx1-ubyte.gz', 'labels'),
)


def _fail(path, what):
    raise DataError('Fashion-MNIST file %s: %s' % (path, what))


def _read_gzip(path):
    try:
        with gzip.open(path, 'rb') as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        # gzip reports bad magic / truncation with multi-line or vague text; keep it to one line.
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _fail(path, 'expected a gzip-compressed IDX file, could not decompress it (%s)' % detail)


def _parse_idx(path, raw, kind):
    """Checks an IDX header and payload size; returns the array (uint8 images or int64 labels)."""
    magic_expected = _IMAGES_MAGIC if kind == 'images' else _LABELS_MAGIC
    ndim = 3 if kind == 'images' else 1
    if len(raw) < 4:
        _fail(path, 'expected an IDX header of at least 4 bytes, found %d bytes' % len(raw))
    magic = struct.unpack('>I', raw[:4])[0]
    if magic != magic_expected:
        _fail(path, 'expected IDX magic %d (%s), found %d' % (magic_expected, kind, magic))
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        _fail(path, 'expected a %d-byte IDX header, file has only %d bytes'
              % (header_len, len(raw)))
    dims = struct.unpack('>%dI' % ndim, raw[4:header_len])
    if kind == 'images' and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        _fail(path, 'expected images of %dx%d pixels, header says %dx%d'
              % (IMAGE_SIZE, IMAGE_SIZE, dims[1], dims[2]))
    if dims[0] == 0:
        _fail(path, 'expected at least one %s entry, header says 0' % kind[:-1])
    payload = int(np.prod(dims))
    if len(raw) - header_len != payload:
        _fail(path, 'expected %d data bytes after the header for dims %s, found %d'
              % (payload, 'x'.join(str(d) for d in dims), len(raw) - header_len))
    array = np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)
    if kind == 'labels':
        bad = np.flatnonzero(array >= NB_CLASSES)
        if bad.size:
            _fail(path, 'expected labels in 0..%d, found %d at index %d'
                  % (NB_CLASSES - 1, int(array[bad[0]]), int(bad[0])))
        array = array.astype(np.int64)
    return array


def validate_fmnist_dir(data_dir=None):
    """Checks every Fashion-MNIST file in data_dir and returns the decoded arrays.

    Args:
      data_dir: directory holding the four *-ubyte.gz files (default: DEFAULT_DATA_DIR).
    Returns:
      dict with 'train_images', 'train_labels', 'test_images', 'test_labels'.
    Raises:
      DataError: if the directory, a file, or its contents is not as expected.
    """
    data_dir = DEFAULT_DATA_DIR if data_dir is None else data_dir
    if not os.path.isdir(data_dir):
        raise DataError('Fashion-MNIST directory %s: expected a directory holding %s, '
                        'but it is missing or not a directory'
                        % (data_dir, ', '.join(f for _, f, _ in _FILES)))
    out = {}
    for key, name, kind in _FILES:
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            _fail(path, 'expected this file to exist, but it is missing')
        out[key] = _parse_idx(path, _read_gzip(path), kind)
    for split in ('train', 'test'):
        n_img, n_lbl = len(out[split + '_images']), len(out[split + '_labels'])
        if n_img != n_lbl:
            _fail(os.path.join(data_dir, dict((k, f) for k, f, _ in _FILES)[split + '_labels']),
                  'expected %d labels to match the %d images, found %d' % (n_img, n_img, n_lbl))
    return out


def load_fmnist(data_dir=None):
    """Loads Fashion-MNIST into memory after validating it.

    Args:
      data_dir: directory holding the four *-ubyte.gz files (default: DEFAULT_DATA_DIR).
    Returns:
      dict: 'train_images' uint8 [60000,28,28], 'train_labels' int64 [60000],
        'test_images' uint8 [10000,28,28], 'test_labels' int64 [10000].
    """
    return validate_fmnist_dir(data_dir)
