"""Reader for the Fashion-MNIST IDX files (gzip-compressed, as distributed).

Files may come from anywhere, so every file is checked to be a regular file, its IDX header is
inflated and checked on its own first, and the rest is inflated in bounded chunks up to exactly
the size the header promises: a gzip bomb, a header claiming billions of entries, trailing data or
a truncated stream is a DataError naming the file before any large buffer is allocated.
"""

import os
import struct
import zlib

import numpy as np

from nets.errors import DataError
from tfquant import files

DEFAULT_DATA_DIR = '/usr/share/datasets/fashion-mnist'
NB_CLASSES = 10
IMAGE_SIZE = 28

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_GZIP_WBITS = 16 + zlib.MAX_WBITS
# Deflate cannot expand data by more than about 1032:1, so a header promising more than this many
# bytes per compressed byte is a lie whatever the stream holds.
_MAX_DEFLATE_RATIO = 1032
# Largest IDX payload accepted (about 1.3 million 28x28 images; Fashion-MNIST's is 47 MB).
MAX_PAYLOAD_BYTES = 1 << 30

# (key, file name, kind) for every file the data set must contain.
_FILES = (
    ('train_images', 'train-images-idx3-ubyte.gz', 'images'),
    ('train_labels', 'train-labels-idx1-ubyte.gz', 'labels'),
    ('test_images', 't10k-images-idx3-ubyte.gz', 'images'),
    ('test_labels', 't10k-labels-idx1-ubyte.gz', 'labels'),
)
_WHAT = 'Fashion-MNIST file'


def _fail(path, what):
    raise DataError('%s %s: %s' % (_WHAT, path, what), path=path)


class _IdxFile:
    """One gzip IDX file whose header has been inflated and checked; the payload is not inflated yet."""

    def __init__(self, path, kind):
        self.path, self.kind = path, kind
        # A valid file is at most the payload cap stored uncompressed plus gzip framing.
        limit = MAX_PAYLOAD_BYTES + MAX_PAYLOAD_BYTES // 1000 + 4096
        self.compressed = files.read_bounded(path, DataError.for_path(path), _WHAT, limit)
        ndim = 3 if kind == 'images' else 1
        self.header_len = 4 + 4 * ndim
        header = self._inflate_header()
        magic_expected = _IMAGES_MAGIC if kind == 'images' else _LABELS_MAGIC
        if len(header) < 4:
            _fail(path, 'expected an IDX header of at least 4 bytes, found %d bytes' % len(header))
        magic = struct.unpack('>I', header[:4])[0]
        if magic != magic_expected:
            _fail(path, 'expected IDX magic %d (%s), found %d' % (magic_expected, kind, magic))
        if len(header) < self.header_len:
            _fail(path, 'expected a %d-byte IDX header, file has only %d bytes' % (self.header_len, len(header)))
        self.dims = struct.unpack('>%dI' % ndim, header[4:self.header_len])
        if kind == 'images' and self.dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            _fail(path, 'expected images of %dx%d pixels, header says %dx%d'
                  % (IMAGE_SIZE, IMAGE_SIZE, self.dims[1], self.dims[2]))
        if self.dims[0] == 0:
            _fail(path, 'expected at least one %s entry, header says 0' % kind[:-1])
        self.payload_len = int(np.prod(self.dims, dtype=object))
        if self.payload_len > MAX_PAYLOAD_BYTES:
            _fail(path, 'header promises %d data bytes for dims %s; expected at most %d'
                  % (self.payload_len, self._dims_text(), MAX_PAYLOAD_BYTES))
        if self.payload_len > _MAX_DEFLATE_RATIO * len(self.compressed):
            _fail(path, 'header promises %d data bytes for dims %s, more than a %d-byte gzip file can hold '
                  '(deflate expands at most %d:1)' % (self.payload_len, self._dims_text(), len(self.compressed),
                                                      _MAX_DEFLATE_RATIO))

    def _dims_text(self):
        return 'x'.join(str(d) for d in self.dims)

    def _inflate_header(self):
        try:
            return zlib.decompressobj(_GZIP_WBITS).decompress(self.compressed, self.header_len)
        except zlib.error as exc:
            _fail(self.path, 'expected a gzip-compressed IDX file, could not decompress it (%s)'
                  % ' '.join(str(exc).split()))

    def read(self):
        """Inflates the payload (never more than the header promises); returns uint8 images or int64 labels."""
        raw = files.inflate_bounded(self.compressed, self.header_len + self.payload_len,
                                    DataError.for_path(self.path), '%s %s' % (_WHAT, self.path), wbits=_GZIP_WBITS)
        self.compressed = None
        found = len(raw) - self.header_len
        if found != self.payload_len:
            _fail(self.path, 'expected %d data bytes after the header for dims %s, found %d'
                  % (self.payload_len, self._dims_text(), found))
        array = np.frombuffer(raw, dtype=np.uint8, offset=self.header_len).reshape(self.dims)
        if self.kind == 'labels':
            bad = np.flatnonzero(array >= NB_CLASSES)
            if bad.size:
                _fail(self.path, 'expected labels in 0..%d, found %d at index %d'
                      % (NB_CLASSES - 1, int(array[bad[0]]), int(bad[0])))
            array = array.astype(np.int64)
        return array


def validate_fmnist_dir(data_dir=None):
    """Checks every Fashion-MNIST file in data_dir and returns the decoded arrays.

    All four headers are checked (including that each split has as many labels as images) before
    any payload is inflated.
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
                        % (data_dir, ', '.join(f for _, f, _ in _FILES)), path=data_dir)
    idx_files = {}
    for key, name, kind in _FILES:
        path = os.path.join(data_dir, name)
        if not os.path.lexists(path):
            _fail(path, 'expected this file to exist, but it is missing')
        idx_files[key] = _IdxFile(path, kind)
    for split in ('train', 'test'):
        images, labels = idx_files[split + '_images'], idx_files[split + '_labels']
        if images.dims[0] != labels.dims[0]:
            _fail(labels.path, 'expected %d labels to match the %d images of %s, header says %d'
                  % (images.dims[0], images.dims[0], images.path, labels.dims[0]))
    return {key: idx.read() for key, idx in idx_files.items()}


def load_fmnist(data_dir=None):
    """Loads Fashion-MNIST into memory after validating it.

    Args:
      data_dir: directory holding the four *-ubyte.gz files (default: DEFAULT_DATA_DIR).
    Returns:
      dict: 'train_images' uint8 [60000,28,28], 'train_labels' int64 [60000],
        'test_images' uint8 [10000,28,28], 'test_labels' int64 [10000].
    """
    return validate_fmnist_dir(data_dir)
