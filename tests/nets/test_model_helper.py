"""Model helpers: datasets, graphs, loss, learning-rate schedule, short training."""

import math
import os

import numpy as np
import pytest
import tensorflow as tf

from nets import model_helper
from nets.data import cifar10
from nets.errors import DataError

tf1 = tf.compat.v1

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST_DIR),
                                  reason='Fashion-MNIST not installed at ' + FMNIST_DIR)


@pytest.fixture(scope='module')
def fmnist_resnet():
    from nets.resnet_at_fmnist import ModelHelper
    return ModelHelper(resnet_size=20, batch_size=32, batch_size_eval=64, lrn_rate_init=0.05,
                       train_subset=256, eval_subset=150, seed=0)


def _write_tiny_cifar(d, n=40):
    rng = np.random.RandomState(0)
    for name in cifar10.TRAIN_FILES + cifar10.TEST_FILES:
        recs = rng.randint(0, 256, (n, 3073)).astype(np.uint8)
        recs[:, 0] = rng.randint(0, 10, n)
        recs.tofile(os.path.join(d, name))


@needs_fmnist
def test_fmnist_helper_properties(fmnist_resnet):
    h = fmnist_resnet
    assert (h.model_name, h.dataset_name, h.nb_classes) == ('resnet_20', 'fmnist', 10)
    assert (h.n_train, h.n_eval, h.nb_eval_batches) == (256, 150, 3)
    assert h.nb_iters_train() == math.ceil(h.base_epochs * 256 / 32)


@needs_fmnist
def test_eval_pass_covers_every_example_once(fmnist_resnet, session_config):
    h = fmnist_resnet
    with tf.Graph().as_default():
        images, labels = h.build_dataset_eval()
        logits = h.forward_eval(images)
        with tf1.Session(config=session_config) as sess:
            sess.run(tf1.global_variables_initializer())
            for _ in range(2):  # the pass can be restarted
                sess.run(h.eval_init_op)
                sizes = [len(sess.run(labels)) for _ in range(h.nb_eval_batches)]
                with pytest.raises(tf.errors.OutOfRangeError):
                    sess.run(labels)
                assert sizes == [64, 64, 22]
        assert logits.shape.as_list() == [None, 10]


@needs_fmnist
def test_few_steps_reduce_loss_and_checkpoint_restores(fmnist_resnet, session_config, tmp_path):
    h = fmnist_resnet
    ckpt = str(tmp_path / 'model.ckpt')
    with tf.Graph().as_default():
        tf1.set_random_seed(0)
        images, labels = h.build_dataset_train()
        assert images.shape.as_list() == [32, 28, 28, 1]
        logits = h.forward_train(images)
        train_vars = sorted(v.op.name for v in tf1.global_variables())
        loss, metrics = h.calc_loss(labels, logits, tf1.trainable_variables())
        assert set(metrics) >= {'loss', 'accuracy'}
        step = tf1.train.get_or_create_global_step()
        lrn_rate, _ = h.setup_lrn_rate(step)
        with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
            train_op = tf1.train.MomentumOptimizer(lrn_rate, h.momentum).minimize(loss, step)
        with tf1.Session(config=session_config) as sess:
            sess.run(tf1.global_variables_initializer())
            losses = [sess.run([train_op, metrics['cross_entropy']])[1] for _ in range(24)]
            tf1.train.Saver(tf1.global_variables('model')).save(sess, ckpt, write_meta_graph=False)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3
    with tf.Graph().as_default():
        images, _ = h.build_dataset_eval()
        h.forward_eval(images)
        eval_vars = sorted(v.op.name for v in tf1.global_variables())
        with tf1.Session(config=session_config) as sess:
            tf1.train.Saver().restore(sess, ckpt)
    assert eval_vars == train_vars


@needs_fmnist
def test_weight_decay_term(fmnist_resnet, session_config):
    h = fmnist_resnet
    with tf.Graph().as_default():
        logits = h.forward_eval(tf.zeros([2, 28, 28, 1]))
        labels = tf.constant([0, 1])
        loss, metrics = h.calc_loss(labels, logits, tf1.trainable_variables())
        weights = [v for v in tf1.trainable_variables() if v.op.name.endswith('weights')]
        assert len(weights) == 22  # 21 convolutions and the classifier
        with tf1.Session(config=session_config) as sess:
            sess.run(tf1.global_variables_initializer())
            got, ce, ws = sess.run([loss, metrics['cross_entropy'], weights])
    expected = ce + h.loss_w_dcy / 2 * sum(float(np.sum(w.astype(np.float64) ** 2)) for w in ws)
    assert got == pytest.approx(expected, rel=1e-5)


@needs_fmnist
def test_fmnist_training_graph_holds_no_data(session_config):
    from nets.resnet_at_fmnist import ModelHelper
    h = ModelHelper(batch_size=16, seed=0)  # all 60,000 training images (47 MB)
    with tf.Graph().as_default() as graph:
        images, labels = h.build_dataset_train(skip_batches=3)
        logits = h.forward_train(images)
        h.calc_loss(labels, logits, tf1.trainable_variables())
        h.build_dataset_eval()
        size = graph.as_graph_def().ByteSize()
        with tf1.Session(config=session_config) as sess:
            batch_labels = sess.run(labels)
    assert size < 1 << 20, size  # was about 95 MB with the arrays as constants
    assert batch_labels.shape == (16,) and set(batch_labels.tolist()) <= set(range(10))
    assert h.n_train == 60000


@pytest.mark.parametrize('schedule', ['cosine', 'step'])
def test_lrn_rate_schedule(schedule, session_config):
    with tf.Graph().as_default():
        step = tf1.placeholder(tf.int64, [])
        lr = model_helper.lrn_rate_for_step(step, 1000, 0.1, schedule, warmup_ratio=0.02)
        with tf1.Session(config=session_config) as sess:
            values = {s: sess.run(lr, {step: s}) for s in (0, 19, 20, 499, 501, 749, 750, 751, 999)}
    if schedule == 'step':
        assert values[0] == pytest.approx(0.1) and values[499] == pytest.approx(0.1)
        # piecewise_constant switches after a boundary: 500 -> 0.01 from 501, 750 -> 0.001 from 751.
        assert values[501] == pytest.approx(0.01) and values[750] == pytest.approx(0.01)
        assert values[751] == pytest.approx(0.001)
    else:
        assert values[0] == pytest.approx(0.1 / 20)
        assert values[20] == pytest.approx(0.1)
        assert values[999] < 1e-3
        assert values[499] > values[750] > values[999]


def test_cifar_helper_on_tiny_files(tmp_path, session_config):
    from nets.resnet_at_cifar10 import ModelHelper
    _write_tiny_cifar(str(tmp_path))
    h = ModelHelper(str(tmp_path), batch_size=16, batch_size_eval=16, nb_epochs_rat=0.5)
    assert (h.n_train, h.n_eval, h.dataset_name) == (200, 40, 'cifar_10')
    assert h.nb_iters_train() == math.ceil(0.5 * h.base_epochs * 200 / 16)
    with tf.Graph().as_default():
        images, labels = h.build_dataset_train()
        logits = h.forward_train(images)
        with tf1.Session(config=session_config) as sess:
            sess.run(tf1.global_variables_initializer())
            x, out = sess.run([images, logits])
    assert x.shape == (16, 32, 32, 3) and out.shape == (16, 10)


def test_cifar_helper_reports_bad_dir(tmp_path):
    from nets.resnet_at_cifar10 import ModelHelper
    with pytest.raises(DataError, match=str(tmp_path)):
        ModelHelper(str(tmp_path))


def test_helper_rejects_bad_resnet_size(tmp_path):
    from nets.resnet_at_cifar10 import ModelHelper
    with pytest.raises(ValueError, match='resnet_size 18'):
        ModelHelper(str(tmp_path), resnet_size=18)
