"""Input pipelines and batched preprocessing."""

import numpy as np
import tensorflow as tf

from nets.data import pipeline

tf1 = tf.compat.v1


def _run(fetches, config=None):
    with tf1.Session(config=config) as sess:
        return sess.run(fetches)


def test_cifar_eval_preprocess_matches_numpy(session_config):
    rng = np.random.RandomState(1)
    imgs = rng.randint(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    with tf.Graph().as_default():
        out, lbl = pipeline.cifar10_eval_preprocess(tf.constant(imgs), tf.constant([1, 2, 3, 4, 5]))
        out, lbl = _run([out, lbl], session_config)
    mean = np.array([0.4914, 0.4822, 0.4465])
    std = np.array([0.2470, 0.2435, 0.2616])
    np.testing.assert_allclose(out, (imgs / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    assert lbl.tolist() == [1, 2, 3, 4, 5]


def test_fmnist_eval_preprocess_matches_numpy(session_config):
    rng = np.random.RandomState(2)
    imgs = rng.randint(0, 256, (7, 28, 28)).astype(np.uint8)
    labels = np.arange(7)
    with tf.Graph().as_default():
        ds = pipeline.make_eval_dataset(imgs, labels, 3, pipeline.fmnist_eval_preprocess)
        x, y = tf1.data.make_one_shot_iterator(ds).get_next()
        with tf1.Session(config=session_config) as sess:
            batches = []
            try:
                while True:
                    batches.append(sess.run([x, y]))
            except tf.errors.OutOfRangeError:
                pass
    # One in-order pass, last partial batch kept.
    assert [len(b[1]) for b in batches] == [3, 3, 1]
    assert np.concatenate([b[1] for b in batches]).tolist() == labels.tolist()
    got = np.concatenate([b[0] for b in batches])
    assert got.shape == (7, 28, 28, 1)
    np.testing.assert_allclose(got[..., 0], (imgs / 255.0 - 0.2860) / 0.3530, atol=1e-5)
    assert pipeline.nb_eval_batches(7, 3) == 3


def test_random_crop_shape_and_content(session_config):
    rng = np.random.RandomState(3)
    imgs = rng.randint(1, 256, (16, 32, 32, 3)).astype(np.uint8)
    with tf.Graph().as_default():
        out = _run(pipeline.random_crop_batch(tf.constant(imgs), 4, seed=5), session_config)
    assert out.shape == (16, 32, 32, 3)
    padded = np.pad(imgs, [(0, 0), (4, 4), (4, 4), (0, 0)])
    # Each output must be exactly one 32x32 window of its own padded input.
    for i in range(16):
        windows = [(dy, dx) for dy in range(9) for dx in range(9)
                   if np.array_equal(padded[i, dy:dy + 32, dx:dx + 32], out[i])]
        assert windows, 'example %d is not a crop of its padded input' % i
    assert not all(np.array_equal(out[i], imgs[i]) for i in range(16))


def test_random_flip_is_a_mirror(session_config):
    rng = np.random.RandomState(4)
    imgs = rng.randint(0, 256, (64, 8, 8, 2)).astype(np.uint8)
    with tf.Graph().as_default():
        out = _run(pipeline.random_flip_batch(tf.constant(imgs), seed=7), session_config)
    flipped = [np.array_equal(out[i], imgs[i, :, ::-1]) for i in range(64)]
    kept = [np.array_equal(out[i], imgs[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_train_dataset_shapes_and_epoch_coverage(session_config):
    imgs = np.repeat(np.arange(20, dtype=np.uint8)[:, None, None], 28 * 28, 1).reshape(20, 28, 28)
    labels = np.arange(20) % 10
    with tf.Graph().as_default():
        ds = pipeline.make_train_dataset(imgs, labels, 4, pipeline.fmnist_eval_preprocess, seed=0)
        x, y = tf1.data.make_one_shot_iterator(ds).get_next()
        with tf1.Session(config=session_config) as sess:
            xs = [sess.run(x) for _ in range(5)]
    assert all(b.shape == (4, 28, 28, 1) for b in xs)
    # One epoch = 5 batches of 4 drawn without replacement: every image appears once.
    ids = np.round(np.concatenate([b[:, 0, 0, 0] for b in xs]) * 0.3530 + 0.2860, 6) * 255
    assert sorted(np.round(ids).astype(int).tolist()) == list(range(20))


def _old_constant_train_dataset(images, labels, batch_size, preprocess_fn, seed):
    """The pipeline before the data left the graph: whole arrays as constants, gathered per batch."""
    images = images[..., None]
    order = tf.data.Dataset.range(len(images)).shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    order = order.repeat().batch(batch_size, drop_remainder=True).enumerate()
    all_images, all_labels = tf.constant(images), tf.constant(np.asarray(labels, np.int64))

    def load(position, indices):
        seed_pair = tf.stack([tf.constant(seed, tf.int64), position])
        return preprocess_fn(tf.gather(all_images, indices), tf.gather(all_labels, indices), stateless_seed=seed_pair)
    return order.map(load)


def _batches(ds, count, config):
    x, y = tf1.data.make_one_shot_iterator(ds).get_next()
    with tf1.Session(config=config) as sess:
        return [sess.run([x, y]) for _ in range(count)]


def test_train_batches_equal_the_old_in_graph_pipeline(session_config):
    rng = np.random.RandomState(6)
    imgs = rng.randint(0, 256, (50, 28, 28)).astype(np.uint8)
    labels = rng.randint(0, 10, 50)
    with tf.Graph().as_default():
        old = _batches(_old_constant_train_dataset(imgs, labels, 8, pipeline.fmnist_train_preprocess, 4), 9,
                       session_config)
    with tf.Graph().as_default() as graph:
        new = _batches(pipeline.make_train_dataset(imgs, labels, 8, pipeline.fmnist_train_preprocess, seed=4), 9,
                       session_config)
        # No node holds the images: the largest constant is far smaller than the 39,200-byte array.
        consts = [n for n in _all_nodes(graph.as_graph_def()) if n.op == 'Const']
        assert max(len(n.attr['value'].tensor.tensor_content) for n in consts) < 1000
    for (x, y), (nx, ny) in zip(old, new):  # 9 batches of 8 cross the 50-example epoch boundary
        np.testing.assert_array_equal(nx, x)
        np.testing.assert_array_equal(ny, y)
    assert new[0][0].dtype == np.float32 and new[0][1].dtype == np.int64


def _all_nodes(graph_def):
    yield from graph_def.node
    for function in graph_def.library.function:
        yield from function.node_def


def test_eval_batches_keep_the_data_out_of_the_graph(session_config):
    rng = np.random.RandomState(8)
    imgs = rng.randint(0, 256, (30, 32, 32, 3)).astype(np.uint8)
    labels = rng.randint(0, 10, 30)
    with tf.Graph().as_default() as graph:
        ds = pipeline.make_eval_dataset(imgs, labels, 7, lambda x, y: (x, y))
        got = _batches(ds, 5, session_config)
        assert graph.as_graph_def().ByteSize() < 20000  # the images alone are 92,160 bytes
    np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), imgs)
    assert np.concatenate([y for _, y in got]).tolist() == labels.tolist()
    assert [len(y) for _, y in got] == [7, 7, 7, 7, 2]


def test_array_data_subset_and_resume(session_config):
    rng = np.random.RandomState(10)
    data = pipeline.ArrayData(rng.randint(0, 256, (40, 6, 6)).astype(np.uint8), np.arange(40),
                              rng.randint(0, 256, (9, 6, 6)).astype(np.uint8), np.arange(9) % 10)
    small = data.limited(train_subset=21, eval_subset=100)
    assert (small.n_train, small.n_eval) == (21, 9)
    with tf.Graph().as_default():
        full = _batches(small.train_dataset(5, pipeline.fmnist_train_preprocess, seed=1), 12, session_config)
    with tf.Graph().as_default():
        resumed = _batches(small.train_dataset(5, pipeline.fmnist_train_preprocess, seed=1, skip_batches=7), 5,
                           session_config)
    for (x, y), (rx, ry) in zip(full[7:], resumed):
        np.testing.assert_array_equal(rx, x)
        np.testing.assert_array_equal(ry, y)
    # Only the first 21 examples are used: 4 batches of 5 per epoch, each a draw without replacement.
    seen = np.concatenate([y for _, y in full[:4]]).tolist()
    assert len(set(seen)) == 20 and set(seen) < set(range(21))
