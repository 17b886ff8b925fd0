"""The --data_npz source: contents streamed as given, and one clear DataError per kind of bad archive."""
import os
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from nets.data import npz
from nets.errors import DataError


def arrays(dtype=np.float32, n_train=10, n_test=6):
    rng = np.random.default_rng(0)
    return {"x_train": (rng.random((n_train, 4, 5, 2)) * 100).astype(dtype), "y_train": rng.integers(0, 3, n_train),
            "x_test": (rng.random((n_test, 4, 5, 2)) * 100).astype(dtype), "y_test": rng.integers(0, 3, n_test)}


def write(tmp_path, name="data.npz", compressed=False, **contents):
    path = str(tmp_path / name)
    (np.savez_compressed if compressed else np.savez)(path, **contents)
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float16, np.float64, ">f4"])
def test_images_reach_the_graph_as_float32_unchanged(tmp_path, dtype):
    contents = arrays(dtype)
    data = npz.load_npz(write(tmp_path, compressed=dtype == np.int16, **contents))
    assert (data.n_train, data.n_eval) == (10, 6)
    graph = tf.Graph()
    with graph.as_default():
        images, labels = tf.compat.v1.data.make_one_shot_iterator(
            data.eval_dataset(4, npz.as_float32)).get_next()
        with tf.compat.v1.Session() as sess:
            got = [sess.run([images, labels]) for _ in range(2)]
    assert got[0][0].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), contents["x_test"].astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), contents["y_test"])


def test_training_stream_draws_from_the_training_arrays(tmp_path):
    contents = arrays(np.float32)
    data = npz.load_npz(write(tmp_path, **contents))
    graph = tf.Graph()
    with graph.as_default():
        images, labels = tf.compat.v1.data.make_one_shot_iterator(
            data.train_dataset(5, npz.as_float32, seed=1)).get_next()
        with tf.compat.v1.Session() as sess:
            batch_images, batch_labels = sess.run([images, labels])
    for image, label in zip(batch_images, batch_labels):
        index = [i for i in range(10) if np.array_equal(contents["x_train"][i], image)]
        assert index and contents["y_train"][index[0]] == label


def expect_error(path, *fragments):
    with pytest.raises(DataError) as info:
        npz.load_npz(path)
    message = str(info.value)
    assert "\n" not in message and path in message and info.value.path == path
    for fragment in fragments:
        assert fragment in message, message


def test_missing_array(tmp_path):
    contents = arrays()
    del contents["y_test"]
    expect_error(write(tmp_path, **contents), "has no array y_test", "x_train, y_train, x_test, y_test")


def test_label_count_mismatch(tmp_path):
    contents = arrays()
    contents["y_train"] = contents["y_train"][:7]
    expect_error(write(tmp_path, **contents), "y_train has 7 labels for 10 images")


def test_image_shape_mismatch_between_splits(tmp_path):
    contents = arrays()
    contents["x_test"] = contents["x_test"][:, :3]
    expect_error(write(tmp_path, **contents), "x_train images are (4, 5, 2) but x_test images are (3, 5, 2)")


@pytest.mark.parametrize("field,value,fragment", [
    ("x_train", np.zeros((10, 4)), "expected images N x H x W x C"),
    ("x_train", np.zeros((10, 4, 5, 2), np.complex64), "expected a real numeric dtype"),
    ("x_train", np.full((10, 4, 5, 2), np.nan, np.float32), "NaN or infinite"),
    ("y_train", np.zeros(10, np.float32), "expected a vector of integer class ids"),
    ("y_test", -np.ones(6, np.int64), "negative label -1"),
])
def test_bad_contents(tmp_path, field, value, fragment):
    contents = arrays()
    contents[field] = value
    expect_error(write(tmp_path, **contents), fragment)


def test_pickled_objects_are_never_loaded(tmp_path):
    contents = arrays()
    contents["y_train"] = np.array([object()] * 10, dtype=object)
    expect_error(write(tmp_path, **contents), "pickled data")


def test_header_promising_more_than_the_member_holds(tmp_path):
    path = write(tmp_path, **arrays())
    forged = str(tmp_path / "forged.npz")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(forged, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "x_train.npy":
                data = data.replace(b"(10, 4, 5, 2)", b"(10, 4000, 5000, 2)")
            target.writestr(info.filename, data)
    expect_error(forged, "array x_train has shape (10, 4000, 5000, 2)", "holds only")


def test_not_an_archive_and_not_a_regular_file(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    expect_error(str(junk), "cannot be read", "numpy.savez")
    expect_error(str(tmp_path), "is a directory")
    fifo = str(tmp_path / "fifo.npz")
    os.mkfifo(fifo)
    expect_error(fifo, "is a FIFO")
