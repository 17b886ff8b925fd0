"""Your own data without code: a NumPy .npz archive holding x_train, y_train, x_test and y_test.

Images are N x H x W x C (or N x H x W, one channel) of any real numeric dtype and are fed to the model as
float32 unchanged: a Keras model owns its preprocessing. Labels are integer class ids. The archive may come
from anywhere, so it must be a regular file, no member may hold pickled objects, and each array's header is
checked against the sizes the archive declares before any array is allocated (a zip bomb or a header
promising terabytes is an error, not a MemoryError).
"""
import zipfile

import numpy as np
import tensorflow as tf

from nets.data import pipeline
from nets.errors import DataError
from tfquant import files

ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")
_WHAT = "data archive"
# Deflate cannot expand data by more than about 1032:1; a member declaring more lies.
_MAX_DEFLATE_RATIO = 1032
# The dtype as_float32 gives the model; finiteness is checked in it.
MODEL_DTYPE = np.float32


def _fail(path, message):
    raise DataError("%s %s: %s" % (_WHAT, path, message), path=path)


def _read_member(archive, path, name):
    """One array of the archive, its header checked before the data is read."""
    try:
        info = archive.getinfo(name + ".npy")
    except KeyError:
        _fail(path, "has no array %s; expected arrays %s" % (name, ", ".join(ARRAY_NAMES)))
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > info.compress_size * _MAX_DEFLATE_RATIO + 1024:
        _fail(path, "array %s declares %d bytes from %d compressed ones; expected a genuine numpy archive"
              % (name, info.file_size, info.compress_size))
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, dtype = reader(member)
        if dtype.hasobject:
            _fail(path, "array %s holds Python objects (pickled data), which are never loaded; expected a "
                  "numeric array" % name)
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if nbytes > info.file_size:
            _fail(path, "array %s has shape %s of %s (%d bytes) but its member holds only %d bytes"
                  % (name, shape, dtype, nbytes, info.file_size))
    with archive.open(info) as member:
        array = np.lib.format.read_array(member, allow_pickle=False)
    # tf.numpy_function takes native byte order only.
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _check_finite_as(path, name, images, dtype, chunk=4096):
    """Refuse images that are not finite once cast to `dtype` (what the model sees), naming any that overflow it.

    Checked after the cast: float64 1e300 is finite, but float32 makes it inf, and every logit NaN after it.
    """
    if images.dtype.kind != "f":
        return  # integers up to 2**64 are finite in float32 (and float16 is not a model dtype here)
    nonfinite = overflow = 0
    first = None
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, len(images), chunk):
            part = images[start:start + chunk]
            bad = ~np.isfinite(part.astype(dtype))
            if not bad.any():
                continue
            was_finite = bad & np.isfinite(part)
            nonfinite += int(bad.sum())
            overflow += int(was_finite.sum())
            if first is None and was_finite.any():
                index = tuple(int(i) for i in np.argwhere(was_finite)[0])
                first = ((start + index[0],) + index[1:], part[index])
    if not nonfinite:
        return
    if overflow:
        index, value = first
        _fail(path, "%s holds %d values that overflow %s, the dtype the model reads (e.g. %r at index %s of %s); "
              "expected values within +-%.4g" % (name, overflow, np.dtype(dtype).name, float(value), list(index),
                                                images.dtype, float(np.finfo(dtype).max)))
    _fail(path, "%s holds %d NaN or infinite values; expected finite images" % (name, nonfinite))


def _check_split(path, images_name, images, labels_name, labels):
    if images.ndim not in (3, 4) or 0 in images.shape[1:]:
        _fail(path, "%s has shape %s; expected images N x H x W x C (or N x H x W)" % (images_name, images.shape))
    if images.dtype.kind not in "iuf":
        _fail(path, "%s has dtype %s; expected a real numeric dtype" % (images_name, images.dtype))
    _check_finite_as(path, images_name, images, MODEL_DTYPE)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        _fail(path, "%s has shape %s and dtype %s; expected a vector of integer class ids"
              % (labels_name, labels.shape, labels.dtype))
    if len(labels) != len(images):
        _fail(path, "%s has %d labels for %d images in %s; expected one label per image"
              % (labels_name, len(labels), len(images), images_name))
    if len(labels) == 0:
        _fail(path, "%s is empty; expected at least one example" % images_name)
    if labels.min() < 0:
        _fail(path, "%s holds the negative label %d; expected class ids from 0" % (labels_name, labels.min()))


def load_npz(path):
    """Check and load an .npz data set.

    Args:
      path: the archive (np.savez or np.savez_compressed) with x_train, y_train, x_test, y_test.
    Returns:
      a pipeline.ArrayData over the arrays (images keep their dtype; a preprocess casts them).
    Raises:
      DataError naming the path and what is wrong.
    """
    handle, _ = files.open_regular(path, DataError.for_path(path), _WHAT)
    with handle:
        try:
            with zipfile.ZipFile(handle) as archive:
                arrays = {name: _read_member(archive, path, name) for name in ARRAY_NAMES}
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
            if isinstance(exc, DataError):
                raise
            _fail(path, "cannot be read (%s); expected an archive written by numpy.savez"
                  % " ".join(str(exc).split()))
    _check_split(path, "x_train", arrays["x_train"], "y_train", arrays["y_train"])
    _check_split(path, "x_test", arrays["x_test"], "y_test", arrays["y_test"])
    train_shape, test_shape = arrays["x_train"].shape[1:], arrays["x_test"].shape[1:]
    if train_shape != test_shape:
        _fail(path, "x_train images are %s but x_test images are %s; expected the same image shape"
              % (train_shape, test_shape))
    return pipeline.ArrayData(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])


def as_float32(images, labels):
    """The preprocessing of npz data: the images cast to float32, values unchanged."""
    return tf.cast(images, tf.float32), labels
