"""ILSVRC-12 TFRecords in PocketFlow's layout, streamed by tf.data with parallel JPEG decoding.

Layout (what PocketFlow's and TensorFlow's ImageNet converters write): files `train-*-of-*` and
`validation-*-of-*` in one directory; each record a tf.train.Example with `image/encoded` (a JPEG) and
`image/class/label` (1..1000; PocketFlow's models have nb_classes = 1001, class 0 being the unused
background), optionally `image/object/bbox/{ymin,xmin,ymax,xmax}` (fractions of the image) that guide the
training crop. Labels are kept as they are stored: logit i is class i.

Before any graph is built every file is checked: a regular file whose TFRecord framing holds whole records
(this also counts them, without reading the payloads), and a first record that holds both features. A
missing directory, no matching file, a truncated file or a first record without the features is a
DataError naming the file. Later records that cannot be decoded (a corrupt JPEG, a missing feature) are
skipped and counted as the stream runs, never a crash: `Ilsvrc12Records.skipped` maps each file to its
count and the first skip of each file is printed.

Training stream: epoch e reads the files in an order drawn from (seed, e), interleaved, through a seeded
shuffle buffer; global batches of raw records are cut first, each worker decodes only its slice of every
global batch, and each image's random crop and flip are drawn from (seed, its position in the stream), so the
stream is a pure function of (seed, position) and a resumed or multi-worker run sees the images a single
uninterrupted run would. A batch loses the images skipped in it (it is never refilled from the next one,
which would break that correspondence).
"""

import collections
import glob
import os
import random
import struct
import sys
import threading

import numpy as np
import tensorflow as tf

from nets.data import pipeline
from nets.errors import DataError
from tfquant import files

NB_CLASSES = 1001  # PocketFlow's nb_classes: labels 1..1000, 0 the background class
NB_LABELS = 1000
TRAIN_PATTERN = 'train-*-of-*'
EVAL_PATTERN = 'validation-*-of-*'
DEFAULT_IMAGE_SIZE = 224
# Evaluation resizes the shorter side to image_size * 256 / 224 (256 at 224), then crops the centre.
EVAL_RESIZE_RATIO = 256.0 / 224.0
# RGB statistics of the ILSVRC-12 training set on the 0..255 scale.
MEAN_RGB = (123.68, 116.78, 103.94)
STD_RGB = (58.393, 57.12, 57.375)
# Random-resized-crop: the crop covers 8..100% of the image with aspect ratio 3/4..4/3 (Inception's).
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
# Raw records held by the training shuffle buffer (ILSVRC-12's JPEGs average ~110 kB: ~220 MB).
SHUFFLE_BUFFER_RECORDS = 2048
MAX_RECORD_BYTES = 64 << 20  # the largest record accepted when a file's first record is checked
_FILES_INTERLEAVED = 8  # training files read at a time
_DECODE_CYCLE = 16  # records decoded at a time (interleave's cycle; its threads are AUTOTUNEd)
_WHAT = 'ILSVRC-12 file'
_HEADER = struct.Struct('<QI')  # record length, masked CRC of the length


def _fail(path, what):
    raise DataError('%s %s: %s' % (_WHAT, path, what), path=path)


def count_records(path):
    """Number of records in the TFRecord file `path`, read from its framing alone (payloads are skipped).

    Raises:
      DataError: not a regular file, unreadable, or ending inside a record.
    """
    size = files.regular_file_size(path, DataError.for_path(path), _WHAT)
    handle, _ = files.open_regular(path, DataError.for_path(path), _WHAT)
    count, offset = 0, 0
    with handle:
        while offset < size:
            header = handle.read(_HEADER.size)
            if len(header) < _HEADER.size:
                _fail(path, 'ends inside the header of record %d; expected whole TFRecord records' % count)
            length = _HEADER.unpack(header)[0]
            offset += _HEADER.size + length + 4
            if offset > size:
                _fail(path, 'record %d claims %d bytes past the end of the file; expected whole TFRecord '
                      'records (a truncated copy?)' % (count, offset - size))
            handle.seek(offset)
            count += 1
    return count


def _first_record(path):
    handle, _ = files.open_regular(path, DataError.for_path(path), _WHAT)
    with handle:
        header = handle.read(_HEADER.size)
        length = _HEADER.unpack(header)[0]
        if length > MAX_RECORD_BYTES:
            _fail(path, 'record 0 has %d bytes; expected at most %d' % (length, MAX_RECORD_BYTES))
        return handle.read(length)


def check_first_record(path):
    """Raise DataError unless the first record of `path` is a tf.train.Example with a JPEG and a label in 1..1000."""
    try:
        example = tf.train.Example.FromString(_first_record(path))
    except Exception:  # pylint: disable=broad-except  (protobuf's DecodeError and friends)
        _fail(path, 'record 0 is not a tf.train.Example; expected ILSVRC-12 TFRecords')
    feature = example.features.feature
    if 'image/encoded' not in feature or len(feature['image/encoded'].bytes_list.value) != 1:
        _fail(path, 'record 0 has no image/encoded feature (one JPEG); expected the ILSVRC-12 layout')
    labels = feature['image/class/label'].int64_list.value if 'image/class/label' in feature else []
    if len(labels) != 1:
        _fail(path, 'record 0 has no image/class/label feature (one integer); expected the ILSVRC-12 layout')
    if not 1 <= labels[0] <= NB_LABELS:
        _fail(path, 'record 0 has label %d; expected 1..%d (0 is the background class no image has)'
              % (labels[0], NB_LABELS))


def _split_files(data_dir, pattern):
    paths = sorted(glob.glob(os.path.join(glob.escape(data_dir), pattern)))
    if not paths:
        raise DataError('ILSVRC-12 directory %s: no file matches %s; expected TFRecords named train-00000-of-01024 '
                        '... and validation-00000-of-00128 ... (PocketFlow\'s layout)' % (data_dir, pattern),
                        path=data_dir)
    counts = [count_records(path) for path in paths]
    for path, count in zip(paths, counts):
        if count:
            check_first_record(path)
    if not sum(counts):
        raise DataError('ILSVRC-12 directory %s: the files %s hold no record; expected at least one'
                        % (data_dir, pattern), path=data_dir)
    return list(zip(paths, counts))


def scan_ilsvrc12(data_dir, image_size=DEFAULT_IMAGE_SIZE):
    """Checks the ILSVRC-12 TFRecords in data_dir and returns them as a streamed data source.

    Args:
      data_dir: directory of train-*-of-* and validation-*-of-* files.
      image_size: side of the square images the model reads (224 for ILSVRC-12).
    Returns:
      an Ilsvrc12Records.
    Raises:
      DataError: see the module docstring.
    """
    if data_dir is None or not os.path.isdir(data_dir):
        raise DataError('ILSVRC-12 directory %s: expected a directory of TFRecords (%s, %s), but it is missing '
                        'or not a directory' % (data_dir, TRAIN_PATTERN, EVAL_PATTERN), path=data_dir)
    if int(image_size) < 8:
        raise ValueError('image_size %r is too small; expected at least 8' % (image_size,))
    return Ilsvrc12Records(_split_files(data_dir, TRAIN_PATTERN), _split_files(data_dir, EVAL_PATTERN),
                           int(image_size))


class SkipCounter:
    """Records that could not be decoded, per file; shared by every pipeline of one data source."""

    def __init__(self):
        self.by_file = collections.Counter()
        self._lock = threading.Lock()

    @property
    def total(self):
        """Records skipped so far."""
        return sum(self.by_file.values())

    def record(self, path, index):
        """Count record `index` of `path` as skipped; prints a note the first time a file has one."""
        path = path.decode('utf-8', 'replace') if isinstance(path, bytes) else str(path)
        with self._lock:
            self.by_file[path] += 1
            first = self.by_file[path] == 1
        if first:
            sys.stdout.write('note: %s %s: record %d is not a decodable JPEG with a label; skipped (%d skipped so '
                             'far in all files)\n' % (_WHAT, path, int(index), self.total))
            sys.stdout.flush()
        return np.int64(0)


def _parse(record):
    features = tf.io.parse_single_example(record, {
        'image/encoded': tf.io.FixedLenFeature([], tf.string, default_value=''),
        'image/class/label': tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        'image/object/bbox/ymin': tf.io.VarLenFeature(tf.float32),
        'image/object/bbox/xmin': tf.io.VarLenFeature(tf.float32),
        'image/object/bbox/ymax': tf.io.VarLenFeature(tf.float32),
        'image/object/bbox/xmax': tf.io.VarLenFeature(tf.float32),
    })
    label = features['image/class/label']
    jpeg = features['image/encoded']
    # A record without a label in 1..1000, or whose image does not start as a JPEG does (SOI marker), fails here and is
    # skipped like any undecodable JPEG, before libjpeg would print its complaint on stderr.
    checks = [tf.debugging.assert_greater(label, tf.constant(0, tf.int64), message='record without a label'),
              tf.debugging.assert_less_equal(label, tf.constant(NB_LABELS, tf.int64), message='label above 1000'),
              tf.debugging.assert_equal(tf.strings.substr(jpeg, 0, 2), tf.constant(b'\xff\xd8'),
                                        message='image/encoded is not a JPEG')]
    with tf.control_dependencies(checks):
        label, jpeg = tf.identity(label), tf.identity(jpeg)
    boxes = tf.stack([features['image/object/bbox/' + key].values for key in ('ymin', 'xmin', 'ymax', 'xmax')],
                     axis=1)
    return jpeg, label, boxes


def decode_train(record, image_size, seed):
    """Random-resized crop (guided by the record's boxes, if any) and random flip; float32 [S,S,3] in 0..255.

    Args:
      record: a serialized tf.train.Example.
      image_size: S.
      seed: [2] int tensor; the crop and flip depend on it alone.
    Returns:
      (image, int64 label).
    """
    jpeg, label, boxes = _parse(record)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.image.extract_jpeg_shape(jpeg)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, boxes[None], crop_seed, min_object_covered=0.1, aspect_ratio_range=CROP_ASPECT_RANGE,
        area_range=CROP_AREA_RANGE, max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method='bilinear')
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return image, label


def decode_eval(record, image_size):
    """Resize the shorter side to image_size * 256/224, crop the centre square; float32 [S,S,3] in 0..255."""
    jpeg, label, _ = _parse(record)
    image = tf.image.decode_jpeg(jpeg, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    side = float(round(image_size * EVAL_RESIZE_RATIO))
    scale = side / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
    image = tf.image.resize(image, new_shape, method='bilinear')
    top = (new_shape[0] - image_size) // 2
    left = (new_shape[1] - image_size) // 2
    image = image[top:top + image_size, left:left + image_size]
    image.set_shape([image_size, image_size, 3])
    return image, label


def normalize(images, labels):
    """Batched preprocessing after decoding: per-channel standardisation of 0..255 RGB."""
    return (images - tf.constant(MEAN_RGB)) / tf.constant(STD_RGB), labels


class Ilsvrc12Records:
    """Checked ILSVRC-12 TFRecord files, read by tf.data as the pipelines run (see the module docstring)."""

    def __init__(self, train_files, eval_files, image_size, n_train=None, n_eval=None, skipped=None):
        """Args: [(path, record count)] of each split, the image side, how many records of each split to use (the
        first ones in file order; None: all), and the SkipCounter to share."""
        self.train_files, self.eval_files = list(train_files), list(eval_files)
        self.image_size = int(image_size)
        self.n_train = sum(c for _, c in self.train_files) if n_train is None else int(n_train)
        self.n_eval = sum(c for _, c in self.eval_files) if n_eval is None else int(n_eval)
        self.skipped = skipped if skipped is not None else SkipCounter()

    def limited(self, train_subset=None, eval_subset=None):
        """The same files restricted to the first train_subset / eval_subset records (None: all)."""
        return Ilsvrc12Records(self.train_files, self.eval_files, self.image_size,
                               pipeline.limit_count(self.n_train, train_subset),
                               pipeline.limit_count(self.n_eval, eval_subset), self.skipped)

    @staticmethod
    def _take_first(file_counts, count):
        """(paths, records to read from each) so that the first `count` records in file order are read."""
        paths, limits, left = [], [], count
        for path, available in file_counts:
            if left <= 0:
                break
            if available:
                paths.append(path)
                limits.append(min(available, left))
                left -= limits[-1]
        return paths, np.asarray(limits, np.int64)

    @staticmethod
    def _tagged_records(path, limit):
        """(file, index in file, record) of the first `limit` records of one file."""
        return tf.data.TFRecordDataset(path).take(limit).enumerate().map(lambda index, record: (path, index, record))

    def _safe(self, decode):
        """A per-record interleave function yielding exactly one (image, label, ok): a placeholder when decode fails."""
        size = self.image_size

        def skipped(path, index):
            marker = tf.numpy_function(self.skipped.record, [path, index], tf.int64, stateful=True)
            return (tf.zeros([size, size, 3]) + tf.cast(marker, tf.float32), tf.constant(-1, tf.int64),
                    tf.constant(False))

        def one(path, index, record, *extra):
            good = tf.data.Dataset.from_tensors((record,) + extra).map(
                lambda *args: decode(*args) + (tf.constant(True),)).ignore_errors()
            bad = tf.data.Dataset.from_tensors((path, index)).map(skipped)
            return good.concatenate(bad).take(1)
        return one

    def _decoded_batches(self, tagged, batch_size, decode, preprocess_fn):
        """Decode tagged records in parallel (in order), batch, drop the skipped, preprocess."""
        ds = tagged.interleave(self._safe(decode), cycle_length=_DECODE_CYCLE, block_length=1,
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size)
        size = self.image_size

        def drop_skipped(images, labels, ok):
            images = tf.boolean_mask(images, ok)
            images.set_shape([None, size, size, 3])
            return images, tf.boolean_mask(labels, ok)
        ds = ds.map(drop_skipped)
        ds = ds.filter(lambda images, labels: tf.size(labels) > 0)
        ds = ds.map(preprocess_fn, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    def train_dataset(self, batch_size, preprocess_fn, seed=None, skip_batches=0, shard=(0, 1)):
        """Endless training batches of this worker, a pure function of (seed, position); see the module docstring.

        Args:
          batch_size: the global batch (all workers together).
          preprocess_fn: batched (float images 0..255, labels) -> (images, labels).
          seed: stream seed (None: a random one).
          skip_batches: global batches to skip (a resumed run's step).
          shard: (this worker, number of workers); the worker decodes its slice of each global batch.
        """
        pipeline.check_train_args(self.n_train, batch_size, skip_batches)
        index, count = shard
        if batch_size % count:
            raise ValueError('global batch %d does not split into %d workers' % (batch_size, count))
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 31)
        worker_batch = batch_size // count
        paths, limits = self._take_first(self.train_files, self.n_train)
        start_epoch, offset = divmod(skip_batches * batch_size, self.n_train)
        buffer_records = min(self.n_train, SHUFFLE_BUFFER_RECORDS)
        seed_t = tf.constant(seed, tf.int64)

        def epoch_records(epoch):
            epoch_seed = tf.random.stateless_uniform([], tf.stack([seed_t, epoch]), minval=None, maxval=None,
                                                     dtype=tf.int64)
            order = tf.data.Dataset.from_tensor_slices((paths, limits)).shuffle(len(paths), seed=epoch_seed)
            records = order.interleave(self._tagged_records, cycle_length=min(len(paths), _FILES_INTERLEAVED),
                                       block_length=1)
            return records.shuffle(buffer_records, seed=epoch_seed, reshuffle_each_iteration=False)

        stream = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
        if offset:
            stream = stream.skip(offset)
        stream = stream.batch(batch_size, drop_remainder=True).enumerate(start=skip_batches)

        def worker_slice(position, batch):
            paths_b, indices_b, records_b = batch
            part = slice(index * worker_batch, (index + 1) * worker_batch)
            # Each image's augmentation seed: (stream seed, its position in the global stream).
            positions = position * batch_size + index * worker_batch + tf.range(worker_batch, dtype=tf.int64)
            seeds = tf.stack([tf.fill([worker_batch], seed_t), positions], axis=1)
            return paths_b[part], indices_b[part], records_b[part], seeds

        tagged = stream.map(worker_slice).unbatch()
        size = self.image_size
        return self._decoded_batches(tagged, worker_batch, lambda record, seed_: decode_train(record, size, seed_),
                                     preprocess_fn)

    def eval_dataset(self, batch_size, preprocess_fn):
        """One in-order pass over the first n_eval validation records (last partial batch kept)."""
        paths, limits = self._take_first(self.eval_files, self.n_eval)
        tagged = tf.data.Dataset.from_tensor_slices((paths, limits)).flat_map(self._tagged_records)
        size = self.image_size
        return self._decoded_batches(tagged, batch_size, lambda record: decode_eval(record, size), preprocess_fn)
