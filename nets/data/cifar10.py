"""The CIFAR-10 binary release (data_batch_1.bin .. data_batch_5.bin, test_batch.bin), streamed from disk.

Records are read with tf.data.FixedLengthRecordDataset (as PocketFlow does), so nothing of the data
set enters the graph and data sets past 2 GB work. The files are checked before any graph is built:
regular files, sizes a positive multiple of 3073 bytes, readable, and labels in 0..9.

Training order: each epoch streams the records in file order through a seeded shuffle buffer whose
seed is drawn from (seed, epoch). A buffer, not a shuffle of record indices, because the files are
read sequentially (no random access, memory bounded by the buffer); CIFAR-10's 50,000 training
records fit in one buffer, so its epochs are uniform permutations. Seeding each epoch on its own
makes the stream a pure function of (seed, batch position) and lets a resumed run start at its
epoch directly, reading at most one epoch of records to reach its batch.
"""

import os
import random

import numpy as np
import tensorflow as tf

from nets.data import pipeline
from nets.errors import DataError
from tfquant import files

NB_CLASSES = 10
IMAGE_SIZE = 32
NB_CHANNELS = 3
RECORD_BYTES = 1 + IMAGE_SIZE * IMAGE_SIZE * NB_CHANNELS  # 3073: label byte + CHW pixels
RECORDS_PER_FILE = 10000  # in the official release; smaller and larger files are accepted

TRAIN_FILES = tuple('data_batch_%d.bin' % i for i in range(1, 6))
TEST_FILES = ('test_batch.bin',)

# Records held by the training shuffle buffer (256 MiB of records; CIFAR-10 needs 150 MiB).
SHUFFLE_BUFFER_RECORDS = (256 << 20) // RECORD_BYTES
# Data sets up to this size have every label checked before training; larger ones have the first
# and last record of each file checked up front and every label checked as it is read.
LABEL_SCAN_LIMIT_BYTES = 1 << 30
_READ_BUFFER_BYTES = 1 << 20
_SCAN_CHUNK_RECORDS = 4096
_WHAT = 'CIFAR-10 file'


def _fail(path, what):
    raise DataError('%s %s: %s' % (_WHAT, path, what), path=path)


def _check_dir(data_dir):
    if data_dir is None or not os.path.isdir(data_dir):
        raise DataError('CIFAR-10 directory %s: expected a directory holding the binary release '
                        '(%s), but it is missing or not a directory'
                        % (data_dir, ', '.join(TRAIN_FILES + TEST_FILES)), path=data_dir)


def _record_count(path):
    if not os.path.lexists(path):
        _fail(path, 'expected this file to exist, but it is missing')
    size = files.regular_file_size(path, DataError.for_path(path), _WHAT)
    if size == 0 or size % RECORD_BYTES:
        _fail(path, 'expected a positive multiple of %d bytes (%d for the official %d-record '
              'file), found %d bytes' % (RECORD_BYTES, RECORD_BYTES * RECORDS_PER_FILE,
                                         RECORDS_PER_FILE, size))
    return size // RECORD_BYTES


def _check_labels(path, first, count):
    """Reads records first..first+count-1 of path in bounded chunks; fails on a label outside 0..9."""
    handle, _ = files.open_regular(path, DataError.for_path(path), _WHAT)
    with handle:
        handle.seek(first * RECORD_BYTES)
        chunk = bytearray(min(count, _SCAN_CHUNK_RECORDS) * RECORD_BYTES)
        done = 0
        while done < count:
            want = min(count - done, _SCAN_CHUNK_RECORDS) * RECORD_BYTES
            try:
                got = handle.readinto(memoryview(chunk)[:want])
            except OSError as exc:
                _fail(path, 'cannot be read (%s)' % ' '.join(str(exc.strerror or exc).split()))
            if got != want:
                _fail(path, 'ended after record %d while being read; expected %d records'
                      % (first + done + got // RECORD_BYTES, first + count))
            labels = np.frombuffer(chunk, np.uint8, count=want)[::RECORD_BYTES]
            bad = np.flatnonzero(labels >= NB_CLASSES)
            if bad.size:
                _fail(path, 'expected labels in 0..%d, found %d in record %d'
                      % (NB_CLASSES - 1, int(labels[bad[0]]), first + done + int(bad[0])))
            done += want // RECORD_BYTES


def scan_cifar10(data_dir):
    """Checks the CIFAR-10 binary release in data_dir and returns it as a streamed data source.

    Args:
      data_dir: directory of the CIFAR-10 binary release.
    Returns:
      a Cifar10Files.
    Raises:
      DataError: if the directory or a file is missing, not a regular file, unreadable, has a size
        that is not a positive multiple of 3073 bytes, or holds a label outside 0..9.
    """
    _check_dir(data_dir)
    paths = [os.path.join(data_dir, name) for name in TRAIN_FILES + TEST_FILES]
    counts = [_record_count(path) for path in paths]
    scan_all = sum(counts) * RECORD_BYTES <= LABEL_SCAN_LIMIT_BYTES
    for path, count in zip(paths, counts):
        if scan_all:
            _check_labels(path, 0, count)
        else:
            _check_labels(path, 0, 1)
            _check_labels(path, count - 1, 1)
    nb_train = len(TRAIN_FILES)
    return Cifar10Files(paths[:nb_train], sum(counts[:nb_train]), paths[nb_train:], sum(counts[nb_train:]),
                        labels_checked=scan_all)


def decode_records(records, labels_checked=True):
    """Decodes a batch of 3073-byte records into (uint8 images [B,32,32,3], int64 labels [B]).

    Args:
      records: string tensor [B] of raw records.
      labels_checked: False adds an assertion that every label is in 0..9.
    """
    raw = tf.io.decode_raw(records, tf.uint8)
    raw.set_shape(records.shape.concatenate([RECORD_BYTES]))
    labels = tf.cast(raw[:, 0], tf.int64)
    if not labels_checked:
        check = tf.debugging.assert_less(labels, tf.constant(NB_CLASSES, tf.int64),
                                         message='CIFAR-10 record with a label outside 0..%d' % (NB_CLASSES - 1))
        with tf.control_dependencies([check]):
            labels = tf.identity(labels)
    # The file stores each image as three 32x32 planes (R, G, B); the models want HWC.
    planes = tf.reshape(raw[:, 1:], [-1, NB_CHANNELS, IMAGE_SIZE, IMAGE_SIZE])
    return tf.transpose(planes, [0, 2, 3, 1]), labels


def record_dataset(paths, count):
    """The first `count` raw 3073-byte records of the files `paths`, in order, streamed from disk."""
    ds = tf.data.FixedLengthRecordDataset(paths, RECORD_BYTES, buffer_size=_READ_BUFFER_BYTES)
    return ds.take(count)


class Cifar10Files:
    """Checked CIFAR-10 files, read by tf.data as the pipelines run (see the module docstring)."""

    def __init__(self, train_paths, n_train, test_paths, n_eval, labels_checked=True):
        """Args: the training and test file paths, how many records of each split to use (from the
        start, in file order), and whether every label was checked before training."""
        self.train_paths, self.test_paths = list(train_paths), list(test_paths)
        self.n_train, self.n_eval = int(n_train), int(n_eval)
        self.labels_checked = labels_checked

    def limited(self, train_subset=None, eval_subset=None):
        """The same files restricted to the first train_subset / eval_subset records (None: all)."""
        return Cifar10Files(self.train_paths, pipeline.limit_count(self.n_train, train_subset),
                            self.test_paths, pipeline.limit_count(self.n_eval, eval_subset), self.labels_checked)

    def train_dataset(self, batch_size, preprocess_fn, seed=None, skip_batches=0):
        """Endless training batches, a pure function of (seed, batch position); see make_train_dataset."""
        pipeline.check_train_args(self.n_train, batch_size, skip_batches)
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 31)
        start_epoch, offset = divmod(skip_batches * batch_size, self.n_train)
        buffer_records = min(self.n_train, SHUFFLE_BUFFER_RECORDS)

        def epoch_records(epoch):
            epoch_seed = tf.random.stateless_uniform([], tf.stack([tf.constant(seed, tf.int64), epoch]),
                                                     minval=None, maxval=None, dtype=tf.int64)
            return record_dataset(self.train_paths, self.n_train).shuffle(
                buffer_records, seed=epoch_seed, reshuffle_each_iteration=False)

        stream = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
        if offset:
            stream = stream.skip(offset)
        stream = stream.batch(batch_size, drop_remainder=True).enumerate(start=skip_batches)
        load = pipeline.positioned_loader(lambda records: decode_records(records, self.labels_checked),
                                          preprocess_fn, seed)
        return stream.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    def eval_dataset(self, batch_size, preprocess_fn):
        """One in-order pass over the test records (last partial batch kept)."""
        ds = record_dataset(self.test_paths, self.n_eval).batch(batch_size)
        ds = ds.map(lambda records: preprocess_fn(*decode_records(records, self.labels_checked)),
                    num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)
