"""tf.data input pipelines over in-memory NumPy arrays (kept out of the graph), with batched preprocessing.

Preprocessing functions take a whole batch (uint8 [B,H,W,C] images, int64 [B] labels)
and return (float32 images, int32/int64 labels). Mapping once per batch instead of once
per example is several times faster on a 2-core CPU.
"""

import inspect

import numpy as np
import tensorflow as tf

# Per-channel statistics of the CIFAR-10 training set (pixels scaled to [0,1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Statistics of the Fashion-MNIST training set (pixels scaled to [0,1]).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530


def make_train_dataset(images, labels, batch_size, preprocess_fn, seed=None, skip_batches=0):
    """Builds an endless, reshuffled-every-epoch training dataset over in-memory arrays.

    The arrays stay in Python memory: the graph holds only the shuffled indices, and each batch is
    gathered by a tf.numpy_function, so the GraphDef (and the TensorBoard events it is written to)
    stays small whatever the data set size, and nothing hits the 2 GB protobuf limit.
    With a seed the stream is a pure function of (seed, batch position): the shuffle is seeded and a
    preprocess_fn taking a `stateless_seed` keyword gets a distinct [2] seed per batch position, so a
    run resumed at batch k (skip_batches=k) sees exactly the batches an uninterrupted run would.
    Args:
      images: uint8 NumPy array [N,H,W] or [N,H,W,C].
      labels: integer NumPy array [N].
      batch_size: examples per batch; the last partial batch of each epoch is dropped.
      preprocess_fn: function (uint8 image batch, label batch) -> (float images, labels).
      seed: optional shuffle seed, for reproducible order.
      skip_batches: start this many batches into the stream; skipped on the shuffled indices, before
        any image is gathered or preprocessed, so resuming far into a run stays cheap.
    Returns:
      tf.data.Dataset of (images, labels) batches.
    """
    images, labels = _as_nhwc(images), np.asarray(labels, dtype=np.int64)
    check_train_args(len(images), batch_size, skip_batches)
    count = len(images)
    order = tf.data.Dataset.range(count).shuffle(count, seed=seed, reshuffle_each_iteration=True).repeat()
    order = order.batch(batch_size, drop_remainder=True).enumerate()
    if skip_batches:
        order = order.skip(skip_batches)
    load = positioned_loader(_array_gather(images, labels), preprocess_fn, seed)
    ds = order.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(images, labels, batch_size, preprocess_fn):
    """Builds a single in-order pass over in-memory arrays (last partial batch kept), data outside the graph.

    Args:
      images: uint8 NumPy array [N,H,W] or [N,H,W,C].
      labels: integer NumPy array [N].
      batch_size: examples per batch.
      preprocess_fn: function (uint8 image batch, label batch) -> (float images, labels).
    Returns:
      tf.data.Dataset of (images, labels) batches.
    """
    images, labels = _as_nhwc(images), np.asarray(labels, dtype=np.int64)
    gather = _array_gather(images, labels)
    ds = tf.data.Dataset.range(len(images)).batch(batch_size)
    ds = ds.map(lambda indices: preprocess_fn(*gather(indices)), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def shard_batches(dataset, index, count):
    """Worker `index` of `count`: its slice of every batch of a stream of global batches.

    Slicing the global batch (rather than giving each worker its own stream) keeps the workers' parts
    of every epoch disjoint, keeps the resume position in global batches, and makes a multi-worker run
    see exactly the examples and augmentations of a single run with the global batch size.
    Args:
      dataset: batches (images [count*B, ...], labels [count*B]) with a static batch size.
      index, count: this worker and the number of workers.
    Returns:
      a dataset of (images [B, ...], labels [B]).
    """
    if count == 1:
        return dataset
    global_batch = dataset.element_spec[1].shape[0]
    if global_batch is None or global_batch % count:
        raise ValueError('global batch %s does not split into %d workers' % (global_batch, count))
    size = global_batch // count
    return dataset.map(lambda images, labels: (images[index * size:(index + 1) * size],
                                               labels[index * size:(index + 1) * size]))


def positioned_loader(fetch, preprocess_fn, seed):
    """A map function (batch position, batch key) -> preprocessed batch for an enumerated stream.

    Args:
      fetch: batch key (e.g. indices or raw records) -> (uint8 images, int64 labels) tensors.
      preprocess_fn: function (uint8 image batch, label batch) -> (float images, labels).
      seed: the stream's seed, or None.
    Returns:
      the function; with a seed and a preprocess_fn taking `stateless_seed`, the augmentation of a
      batch depends on (seed, position) alone.
    """
    # Stateful random ops in a parallel map draw in scheduling order and restart on resume.
    with_seed = seed is not None and 'stateless_seed' in inspect.signature(preprocess_fn).parameters

    def load(position, key):
        batch = fetch(key)
        if with_seed:
            stateless_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(position, tf.int64)])
            return preprocess_fn(*batch, stateless_seed=stateless_seed)
        return preprocess_fn(*batch)
    return load


def _array_gather(images, labels):
    """indices tensor [B] -> (images [B,...] of the arrays' dtype, int64 labels [B]) read from the NumPy arrays."""

    def take(indices):
        return images[indices], labels[indices]

    def gather(indices):
        batch_images, batch_labels = tf.numpy_function(take, [indices], (tf.as_dtype(images.dtype), tf.int64),
                                                       stateful=False)
        batch_images.set_shape(indices.shape.concatenate(images.shape[1:]))
        batch_labels.set_shape(indices.shape)
        return batch_images, batch_labels
    return gather


def check_train_args(count, batch_size, skip_batches):
    """Raises ValueError unless count examples give at least one batch and skip_batches is >= 0."""
    if count < batch_size:
        raise ValueError('training set has %d examples, fewer than one batch of %d' % (count, batch_size))
    if skip_batches < 0:
        raise ValueError('skip_batches must be >= 0, got %r' % (skip_batches,))


def limit_count(count, limit):
    """count, or limit when it is set and smaller (a data subset: the first `limit` examples)."""
    return count if limit is None else min(count, int(limit))


class ArrayData:
    """Training and test splits held as NumPy arrays; batches reach tf.data without entering the graph."""

    def __init__(self, train_images, train_labels, test_images, test_labels):
        """Args: uint8 images [N,H,W] or [N,H,W,C] and integer labels [N] of each split."""
        self.train_images, self.train_labels = train_images, np.asarray(train_labels)
        self.test_images, self.test_labels = test_images, np.asarray(test_labels)

    @property
    def n_train(self):
        """Number of training examples."""
        return len(self.train_labels)

    @property
    def n_eval(self):
        """Number of test examples."""
        return len(self.test_labels)

    def limited(self, train_subset=None, eval_subset=None):
        """The first train_subset training and eval_subset test examples (None: all); views, not copies."""
        n_train, n_eval = limit_count(self.n_train, train_subset), limit_count(self.n_eval, eval_subset)
        return ArrayData(self.train_images[:n_train], self.train_labels[:n_train],
                         self.test_images[:n_eval], self.test_labels[:n_eval])

    def train_dataset(self, batch_size, preprocess_fn, seed=None, skip_batches=0):
        """make_train_dataset over the training arrays."""
        return make_train_dataset(self.train_images, self.train_labels, batch_size, preprocess_fn, seed,
                                  skip_batches)

    def eval_dataset(self, batch_size, preprocess_fn):
        """make_eval_dataset over the test arrays."""
        return make_eval_dataset(self.test_images, self.test_labels, batch_size, preprocess_fn)


def nb_eval_batches(nb_examples, batch_size):
    """Number of batches make_eval_dataset yields for nb_examples examples."""
    return -(-nb_examples // batch_size)


def _as_nhwc(images):
    images = np.asarray(images)
    # uint8 for the built-in readers; user data (nets.data.npz) may be any real numeric dtype.
    if images.dtype.kind not in 'iuf':
        raise ValueError('expected numeric images, got %s' % images.dtype)
    return images[..., None] if images.ndim == 3 else images


def normalize(images, mean, std):
    """Scales uint8 pixels to [0,1] then standardises per channel.

    Args:
      images: uint8 tensor [..., C].
      mean: scalar or per-channel sequence.
      std: scalar or per-channel sequence.
    Returns:
      float32 tensor of the same shape.
    """
    x = tf.cast(images, tf.float32) / 255.0
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_flip_batch(images, seed=None, stateless_seed=None):
    """Mirrors each image of an NHWC batch left-right with probability 1/2.

    stateless_seed: optional [2] int tensor; when given the draw depends on it alone (seed is ignored).
    """
    shape = [tf.shape(images)[0]]
    if stateless_seed is not None:
        flip = tf.random.stateless_uniform(shape, stateless_seed) < 0.5
    else:
        flip = tf.random.uniform(shape, seed=seed) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)


def random_crop_batch(images, pad, seed=None, stateless_seed=None):
    """Zero-pads an NHWC batch by pad pixels per side and crops each image at a random offset.

    Args:
      images: tensor [B,H,W,C] with static H and W.
      pad: padding per side; crop offsets are uniform in 0..2*pad.
      seed: optional op seed.
      stateless_seed: optional [2] int tensor; when given the offsets depend on it alone.
    Returns:
      tensor [B,H,W,C].
    """
    height, width = int(images.shape[1]), int(images.shape[2])
    batch = tf.shape(images)[0]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    if stateless_seed is not None:
        offsets = tf.random.stateless_uniform([batch, 2], stateless_seed, 0, 2 * pad + 1, dtype=tf.int32)
    else:
        offsets = tf.random.uniform([batch, 2], 0, 2 * pad + 1, dtype=tf.int32, seed=seed)
    # Per-example crops as two batched gathers: rows first, then columns.
    rows = offsets[:, 0:1] + tf.range(height)[None, :]
    cols = offsets[:, 1:2] + tf.range(width)[None, :]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def cifar10_train_preprocess(images, labels, stateless_seed=None):
    """CIFAR-10 training preprocessing: pad 4 + random 32x32 crop, random flip, normalise.

    stateless_seed: optional [2] int tensor making the augmentation a function of it alone.
    """
    crop_seed = flip_seed = None
    if stateless_seed is not None:
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(stateless_seed, 2))
    x = random_flip_batch(random_crop_batch(images, 4, stateless_seed=crop_seed), stateless_seed=flip_seed)
    return normalize(x, CIFAR10_MEAN, CIFAR10_STD), labels


def cifar10_eval_preprocess(images, labels):
    """CIFAR-10 evaluation preprocessing: per-channel normalisation only."""
    return normalize(images, CIFAR10_MEAN, CIFAR10_STD), labels


def fmnist_train_preprocess(images, labels, stateless_seed=None):
    """Fashion-MNIST training preprocessing: random flip, normalise.

    No pad-and-crop: the default budget is only a few epochs, where stronger augmentation
    slows convergence more than it helps generalisation.
    stateless_seed: optional [2] int tensor making the flips a function of it alone.
    """
    return normalize(random_flip_batch(images, stateless_seed=stateless_seed), FMNIST_MEAN, FMNIST_STD), labels


def fmnist_eval_preprocess(images, labels):
    """Fashion-MNIST evaluation preprocessing: normalisation only."""
    return normalize(images, FMNIST_MEAN, FMNIST_STD), labels
