"""The ILSVRC-12 TFRecord pipeline on generated records: shapes, labels, skipped JPEGs, sharding, top-5, errors."""
import os
import struct

import numpy as np
import pytest
import tensorflow as tf

from nets.data import ilsvrc12
from nets.errors import DataError
from tools import make_ilsvrc12_records

tf1 = tf.compat.v1
SIZE = 16


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """(directory, what the tool wrote) with 2 corrupt JPEGs in each split, 3 files a split, boxes."""
    directory = str(tmp_path_factory.mktemp("ilsvrc12"))
    written = make_ilsvrc12_records.make_records(directory, nb_train=30, nb_eval=21, nb_files=3, min_size=12,
                                                 max_size=40, bboxes=True, corrupt_train=2, corrupt_eval=2, seed=3)
    return directory, written


@pytest.fixture(scope="module")
def clean_records(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ilsvrc12_clean"))
    make_ilsvrc12_records.make_records(directory, nb_train=48, nb_eval=8, nb_files=2, min_size=12, max_size=30,
                                       seed=5)
    return directory


def _run_all(dataset, limit=None):
    graph = tf.Graph()
    with graph.as_default():
        batch = tf1.data.make_one_shot_iterator(dataset()).get_next()
        out = []
        with tf1.Session(graph=graph) as sess:
            while limit is None or len(out) < limit:
                try:
                    out.append(sess.run(batch))
                except tf.errors.OutOfRangeError:
                    break
    return out


def test_record_counts_and_eval_labels_in_file_order(records):
    directory, written = records
    source = ilsvrc12.scan_ilsvrc12(directory, SIZE)
    assert source.n_train == 30 and source.n_eval == 21
    assert [count for _, count in source.eval_files] == [len(v) for v in written["validation"].values()]
    batches = _run_all(lambda: source.eval_dataset(8, ilsvrc12.normalize))
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    expected = [label for path in sorted(written["validation"]) for label, bad in written["validation"][path]
                if not bad]
    # Labels as stored (1..1000; logit i is class i of PocketFlow's 1001), in file order, the corrupt ones skipped.
    np.testing.assert_array_equal(labels, expected)
    assert labels.min() >= 1 and labels.max() <= 1000 and ilsvrc12.NB_CLASSES == 1001
    assert images.shape == (19, SIZE, SIZE, 3) and images.dtype == np.float32
    pixels = images * np.array(ilsvrc12.STD_RGB) + np.array(ilsvrc12.MEAN_RGB)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    # Both corrupt JPEGs were counted against their files.
    bad_files = {path for path, recs in written["validation"].items() if any(bad for _, bad in recs)}
    assert source.skipped.total == 2 and set(source.skipped.by_file) == bad_files


def test_eval_centre_crop_matches_numpy(tmp_path):
    """A 20x40 image: shorter side to round(16*256/224)=18, width 36, centre 16x16 (resize checked by TF's own op)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 40, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(image, quality=100).numpy()
    example = make_ilsvrc12_records.make_example(tf, jpeg, 7, 20, 40, [])
    got, label = ilsvrc12.decode_eval(tf.constant(example.SerializeToString()), SIZE)
    decoded = tf.io.decode_jpeg(jpeg, channels=3)
    resized = tf.image.resize(decoded, [18, 36]).numpy()
    np.testing.assert_allclose(got.numpy(), resized[1:17, 10:26], atol=1e-4)
    assert int(label) == 7


def test_train_stream_skips_and_counts_corrupt_records(records):
    directory, written = records
    source = ilsvrc12.scan_ilsvrc12(directory, SIZE)
    # One epoch of 30 records in batches of 10 holds both corrupt ones: 28 images over 3 batches.
    batches = _run_all(lambda: source.train_dataset(10, ilsvrc12.normalize, seed=1), limit=3)
    assert sum(len(b[1]) for b in batches) == 28
    assert all(b[0].shape[1:] == (SIZE, SIZE, 3) for b in batches)
    assert source.skipped.total >= 2
    all_labels = sorted(label for recs in written["train"].values() for label, bad in recs if not bad)
    assert sorted(np.concatenate([b[1] for b in batches]).tolist()) == all_labels


def test_worker_slices_and_resume_reproduce_the_single_stream(clean_records):
    source = ilsvrc12.scan_ilsvrc12(clean_records, SIZE)
    single = _run_all(lambda: source.train_dataset(8, ilsvrc12.normalize, seed=4), limit=8)
    parts = [_run_all(lambda i=i: source.train_dataset(8, ilsvrc12.normalize, seed=4, shard=(i, 2)), limit=8)
             for i in range(2)]
    for step in range(8):
        np.testing.assert_array_equal(np.concatenate([parts[0][step][1], parts[1][step][1]]), single[step][1])
        np.testing.assert_allclose(np.concatenate([parts[0][step][0], parts[1][step][0]]), single[step][0],
                                   atol=1e-5)
    resumed = _run_all(lambda: source.train_dataset(8, ilsvrc12.normalize, seed=4, skip_batches=7), limit=1)
    np.testing.assert_array_equal(resumed[0][1], single[7][1])
    np.testing.assert_allclose(resumed[0][0], single[7][0], atol=1e-5)
    # Another seed gives other crops of the first batch.
    other = _run_all(lambda: source.train_dataset(8, ilsvrc12.normalize, seed=5), limit=1)
    assert not np.allclose(other[0][0], single[0][0])


def test_top5_metric_matches_numpy(clean_records):
    from nets import resnet_at_ilsvrc12  # pylint: disable=import-outside-toplevel
    helper = resnet_at_ilsvrc12.ModelHelper(clean_records, image_size=32, batch_size=8)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, 1001)).astype(np.float32)
    labels = rng.integers(1, 1001, size=64)
    labels[:20] = np.argsort(-logits[:20], axis=1)[np.arange(20), rng.integers(0, 5, size=20)]  # some hits
    with tf.Graph().as_default():
        _, metrics = helper.calc_loss(tf.constant(labels), tf.constant(logits), [])
        with tf1.Session() as sess:
            top1, top5 = sess.run([metrics["accuracy"], metrics["top5_accuracy"]])
    rank = (logits > logits[np.arange(64), labels][:, None]).sum(axis=1)
    assert top5 == pytest.approx(np.mean(rank < 5)) and top1 == pytest.approx(np.mean(rank == 0))
    assert 20 / 64 <= top5 < 1


def _write(path, payloads):
    with tf.io.TFRecordWriter(path) as writer:
        for payload in payloads:
            writer.write(payload)


def test_bad_directories_are_one_line_errors_naming_the_file(tmp_path, clean_records):
    with pytest.raises(DataError, match="missing or not a directory"):
        ilsvrc12.scan_ilsvrc12(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no file matches train-\*-of-\*"):
        ilsvrc12.scan_ilsvrc12(str(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(clean_records):
        (bad / name).write_bytes(open(os.path.join(clean_records, name), "rb").read())
    no_label = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))}))
    path = str(bad / "validation-00001-of-00002")
    _write(path, [no_label.SerializeToString()])
    with pytest.raises(DataError, match="validation-00001-of-00002: record 0 has no image/class/label") as info:
        ilsvrc12.scan_ilsvrc12(str(bad))
    assert "\n" not in str(info.value)
    data = open(os.path.join(clean_records, "validation-00001-of-00002"), "rb").read()
    (bad / "validation-00001-of-00002").write_bytes(data[:-10])
    with pytest.raises(DataError, match="validation-00001-of-00002: record 3 claims 10 bytes past the end"):
        ilsvrc12.scan_ilsvrc12(str(bad))
    (bad / "validation-00001-of-00002").write_bytes(struct.pack("<Q", 5)[:6])
    with pytest.raises(DataError, match="ends inside the header of record 0"):
        ilsvrc12.scan_ilsvrc12(str(bad))


def test_later_records_without_features_or_with_bad_labels_are_skipped(tmp_path):
    rng = np.random.default_rng(2)
    jpeg = tf.io.encode_jpeg(rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)).numpy()

    def example(label, image=jpeg):
        return make_ilsvrc12_records.make_example(tf, image, label, 20, 20, []).SerializeToString()
    no_image = tf.train.Example(features=tf.train.Features(feature={
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3]))})).SerializeToString()
    png = tf.io.encode_png(np.zeros((20, 20, 3), np.uint8)).numpy()
    _write(str(tmp_path / "train-00000-of-00001"), [example(5)] * 4)
    _write(str(tmp_path / "validation-00000-of-00001"),
           [example(1), example(1500), no_image, example(0), example(9, png), example(1000)])
    source = ilsvrc12.scan_ilsvrc12(str(tmp_path), SIZE)
    batches = _run_all(lambda: source.eval_dataset(4, ilsvrc12.normalize))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), [1, 1000])
    assert source.skipped.by_file == {str(tmp_path / "validation-00000-of-00001"): 4}


def test_record_tool_refuses_bad_arguments_with_one_line(tmp_path, capsys):
    assert make_ilsvrc12_records.main(["--output_dir", str(tmp_path), "--min_size", "4"]) == 2
    assert capsys.readouterr().err == "error: --min_size=4 is not valid; expected an integer >= 8\n"
    assert make_ilsvrc12_records.main(["--output_dir", str(tmp_path), "--nb_eval", "3", "--corrupt_eval", "4"]) == 2
    assert capsys.readouterr().err.startswith("error: more corrupt images than images")
    assert not os.listdir(tmp_path)
