"""CIFAR-10 binary files, written by the tests in the real 3073-byte record format, checked and streamed."""

import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf

from nets.data import cifar10
from nets.errors import DataError

tf1 = tf.compat.v1


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


def _raw(images, labels):
    return images, labels


def _collect(ds, count=None, config=None):
    """Every (images, labels) batch of ds (or the first `count`) as NumPy arrays."""
    x, y = tf1.data.make_one_shot_iterator(ds).get_next()
    out = []
    with tf1.Session(config=config) as sess:
        while count is None or len(out) < count:
            try:
                out.append(sess.run([x, y]))
            except tf.errors.OutOfRangeError:
                break
    return out


def _assert_one_line(exc_info, path):
    msg = str(exc_info.value)
    assert '\n' not in msg and str(path) in msg
    assert exc_info.value.path == str(path)


def test_known_image_round_trip(tmp_path, session_config):
    written = _write_release(str(tmp_path))
    # Hand-built record: a red top-left pixel, a green pixel at (0,1), a blue one at (1,0).
    record = np.zeros(3073, np.uint8)
    record[0] = 7
    record[1 + 0] = 200                 # R plane, row 0 col 0
    record[1 + 1024 + 1] = 150          # G plane, row 0 col 1
    record[1 + 2048 + 32] = 100         # B plane, row 1 col 0
    record.tofile(str(tmp_path / 'test_batch.bin'))
    data = cifar10.scan_cifar10(str(tmp_path))
    assert (data.n_train, data.n_eval) == (15, 1)
    with tf.Graph().as_default():
        [(img, lbl)] = _collect(data.eval_dataset(4, _raw), config=session_config)
    assert img.shape == (1, 32, 32, 3) and img.dtype == np.uint8
    assert img[0, 0, 0].tolist() == [200, 0, 0]
    assert img[0, 0, 1].tolist() == [0, 150, 0]
    assert img[0, 1, 0].tolist() == [0, 0, 100]
    assert int(img.sum()) == 450
    assert lbl.tolist() == [7]
    # The training files, read in order, are the arrays written (independent NumPy transposition).
    with tf.Graph().as_default():
        ds = cifar10.record_dataset(data.train_paths, data.n_train).batch(6).map(cifar10.decode_records)
        batches = _collect(ds, config=session_config)
    assert [len(b[1]) for b in batches] == [6, 6, 3]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]),
                                  np.concatenate([written[n][0] for n in cifar10.TRAIN_FILES]))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]),
                                  np.concatenate([written[n][1] for n in cifar10.TRAIN_FILES]))


def test_train_stream_epochs_are_permutations_and_resume_exactly(tmp_path, session_config):
    # 5 files x 7 records = 35 training records; batches of 4 cross epoch boundaries (35 is not a multiple).
    written = _write_release(str(tmp_path), n_per_file=7, seed=3)
    data = cifar10.scan_cifar10(str(tmp_path))
    train_images = np.concatenate([written[n][0] for n in cifar10.TRAIN_FILES])
    # Every training image is unique, so its index can be recovered from its pixels.
    index_of = {img.tobytes(): i for i, img in enumerate(train_images)}
    with tf.Graph().as_default():
        full = _collect(data.train_dataset(4, _raw, seed=11), 26, session_config)
    order = [index_of[img.tobytes()] for x, _ in full for img in x]
    labels = np.concatenate([written[n][1] for n in cifar10.TRAIN_FILES])
    assert np.concatenate([y for _, y in full]).tolist() == labels[order].tolist()
    # Epoch e is records 35e..35e+34 of the stream: each one a permutation of all 35, and they differ.
    epochs = [order[35 * e:35 * e + 35] for e in range(2)]
    assert all(sorted(epoch) == list(range(35)) for epoch in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(35))
    # Resuming at batch 9 (record 36: one epoch and one record in) gives the very same batches.
    for skip in (9, 17):
        with tf.Graph().as_default():
            resumed = _collect(data.train_dataset(4, _raw, seed=11, skip_batches=skip), 26 - skip, session_config)
        for (x, y), (rx, ry) in zip(full[skip:], resumed):
            np.testing.assert_array_equal(rx, x)
            np.testing.assert_array_equal(ry, y)
    with tf.Graph().as_default():
        other = _collect(data.train_dataset(4, _raw, seed=12), 9, session_config)
    assert [index_of[img.tobytes()] for x, _ in other for img in x] != order[:36]


def test_augmentation_is_reproduced_on_resume(tmp_path, session_config):
    _write_release(str(tmp_path), n_per_file=4, seed=5)
    data = cifar10.scan_cifar10(str(tmp_path))
    with tf.Graph().as_default():
        full = _collect(data.train_dataset(8, cifar10.pipeline.cifar10_train_preprocess, seed=2), 6, session_config)
    with tf.Graph().as_default():
        resumed = _collect(data.train_dataset(8, cifar10.pipeline.cifar10_train_preprocess, seed=2, skip_batches=4),
                           2, session_config)
    for (x, y), (rx, ry) in zip(full[4:], resumed):
        np.testing.assert_array_equal(rx, x)  # crops and flips depend on the batch position only
        np.testing.assert_array_equal(ry, y)


def test_subset_takes_the_first_records(tmp_path, session_config):
    written = _write_release(str(tmp_path), n_per_file=4)
    data = cifar10.scan_cifar10(str(tmp_path)).limited(train_subset=6, eval_subset=3)
    assert (data.n_train, data.n_eval) == (6, 3)
    with tf.Graph().as_default():
        [(img, lbl)] = _collect(data.eval_dataset(10, _raw), config=session_config)
        epoch = _collect(data.train_dataset(3, _raw, seed=0), 2, session_config)
    np.testing.assert_array_equal(img, written['test_batch.bin'][0][:3])
    first_six = np.concatenate([written['data_batch_1.bin'][0], written['data_batch_2.bin'][0][:2]])
    got = np.concatenate([x for x, _ in epoch])
    assert sorted(i.tobytes() for i in got) == sorted(i.tobytes() for i in first_six)


def test_missing_dir(tmp_path):
    with pytest.raises(DataError) as exc_info:
        cifar10.scan_cifar10(str(tmp_path / 'absent'))
    _assert_one_line(exc_info, tmp_path / 'absent')


def test_missing_file(tmp_path):
    _write_release(str(tmp_path))
    os.remove(str(tmp_path / 'data_batch_3.bin'))
    with pytest.raises(DataError, match='missing') as exc_info:
        cifar10.scan_cifar10(str(tmp_path))
    _assert_one_line(exc_info, tmp_path / 'data_batch_3.bin')


def test_size_not_multiple_of_record(tmp_path):
    _write_release(str(tmp_path))
    victim = tmp_path / 'data_batch_2.bin'
    with open(str(victim), 'ab') as f:
        f.write(b'\x00' * 5)
    with pytest.raises(DataError) as exc_info:
        cifar10.scan_cifar10(str(tmp_path))
    _assert_one_line(exc_info, victim)
    assert 'positive multiple of 3073 bytes' in str(exc_info.value) and str(3 * 3073 + 5) in str(exc_info.value)


def test_empty_file(tmp_path):
    _write_release(str(tmp_path))
    (tmp_path / 'test_batch.bin').write_bytes(b'')
    with pytest.raises(DataError, match='positive multiple of 3073'):
        cifar10.scan_cifar10(str(tmp_path))


def test_label_out_of_range(tmp_path):
    _write_release(str(tmp_path))
    victim = tmp_path / 'data_batch_5.bin'
    _write_bin(str(victim), np.zeros((2, 32, 32, 3), np.uint8), [3, 11])
    with pytest.raises(DataError) as exc_info:
        cifar10.scan_cifar10(str(tmp_path))
    _assert_one_line(exc_info, victim)
    assert 'found 11 in record 1' in str(exc_info.value)


def test_fifo_is_refused_without_blocking(tmp_path):
    _write_release(str(tmp_path))
    victim = tmp_path / 'data_batch_4.bin'
    victim.unlink()
    os.mkfifo(str(victim))  # nobody writes to it: opening it for reading would block forever
    with pytest.raises(DataError, match='is a FIFO; expected a regular file') as exc_info:
        cifar10.scan_cifar10(str(tmp_path))
    _assert_one_line(exc_info, victim)


def test_directory_in_place_of_a_file(tmp_path):
    _write_release(str(tmp_path))
    victim = tmp_path / 'test_batch.bin'
    victim.unlink()
    victim.mkdir()
    with pytest.raises(DataError, match='is a directory') as exc_info:
        cifar10.scan_cifar10(str(tmp_path))
    _assert_one_line(exc_info, victim)


@pytest.mark.skipif(os.geteuid() == 0, reason='root reads files whatever their mode')
def test_unreadable_file(tmp_path):
    _write_release(str(tmp_path))
    victim = tmp_path / 'data_batch_1.bin'
    victim.chmod(0)
    with pytest.raises(DataError, match='Permission denied') as exc_info:
        cifar10.scan_cifar10(str(tmp_path))
    _assert_one_line(exc_info, victim)


def test_unchecked_labels_are_asserted_in_the_pipeline(tmp_path, session_config):
    _write_release(str(tmp_path))
    _write_bin(str(tmp_path / 'test_batch.bin'), np.zeros((2, 32, 32, 3), np.uint8), [4, 10])
    data = cifar10.Cifar10Files([], 0, [str(tmp_path / 'test_batch.bin')], 2, labels_checked=False)
    with tf.Graph().as_default():
        with pytest.raises(tf.errors.InvalidArgumentError, match='label outside 0..9'):
            _collect(data.eval_dataset(2, _raw), config=session_config)


@pytest.fixture
def big_dir():
    # tmpfs reads holes without allocating pages; elsewhere the sparse file works too, only slower.
    parent = '/dev/shm' if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=parent) as directory:
        yield directory


def test_data_set_larger_than_2_gb(big_dir, session_config):
    _write_release(big_dir, n_per_file=2)
    # A sparse test file of 700,000 records (2.15 GB, almost all holes = label 0, black image).
    count = 700000
    assert (count - 2) * cifar10.RECORD_BYTES > 2 ** 31
    rng = np.random.RandomState(9)
    tail_images = rng.randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    path = os.path.join(big_dir, 'test_batch.bin')
    _write_bin(path + '.tail', tail_images, [6, 9])
    with open(path, 'wb') as handle:
        handle.truncate(count * cifar10.RECORD_BYTES)
        handle.seek((count - 2) * cifar10.RECORD_BYTES)
        with open(path + '.tail', 'rb') as tail:
            handle.write(tail.read())
    os.remove(path + '.tail')
    data = cifar10.scan_cifar10(big_dir)
    assert (data.n_train, data.n_eval) == (10, count)
    assert not data.labels_checked  # too big to scan up front; the pipeline asserts each label
    with tf.Graph().as_default():
        ds = cifar10.record_dataset(data.test_paths, data.n_eval).skip(count - 3).batch(3)
        [(images, labels)] = _collect(ds.map(lambda r: cifar10.decode_records(r, False)), config=session_config)
    assert labels.tolist() == [0, 6, 9]
    assert not images[0].any()
    np.testing.assert_array_equal(images[1:], tail_images)
    # The up-front check reads the last record, past the 2 GB offset, too.
    with open(path, 'r+b') as handle:
        handle.seek((count - 1) * cifar10.RECORD_BYTES)
        handle.write(bytes([12]))
    with pytest.raises(DataError, match='found 12 in record %d' % (count - 1)):
        cifar10.scan_cifar10(big_dir)
