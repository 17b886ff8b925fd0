"""Layers, ResNet and ConvNet graphs."""

import numpy as np
import pytest
import tensorflow as tf

from nets import convnet, layers, resnet

tf1 = tf.compat.v1


def _resnet_param_count(depth, in_ch, nb_classes):
    """Trainable parameters of a CIFAR ResNet v1, counted from the paper's description."""
    n = (depth - 2) // 6
    conv = lambda k, cin, cout: k * k * cin * cout
    bn = lambda c: 2 * c  # gamma and beta
    total = conv(3, in_ch, 16) + bn(16)
    cin = 16
    for cout in (16, 32, 64):
        for b in range(n):
            total += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
            if cin != cout:
                total += conv(1, cin, cout) + bn(cout)
            cin = cout
    return total + 64 * nb_classes + nb_classes


def _build(fn, shape):
    with tf1.variable_scope('model'):
        return fn(tf1.placeholder(tf.float32, shape))


@pytest.mark.parametrize('shape', [[None, 32, 32, 3], [None, 28, 28, 1]])
def test_resnet20_param_count(shape):
    with tf.Graph().as_default():
        logits = _build(lambda x: resnet.forward_resnet(x, True, 20, 10), shape)
        assert logits.shape.as_list() == [None, 10]
        count = sum(int(np.prod(v.shape)) for v in tf1.trainable_variables())
    expected = _resnet_param_count(20, shape[-1], 10)
    assert count == expected
    if shape[-1] == 3:
        assert count == 272474  # the 0.27M of He et al. (2016), table 6


def test_resnet56_param_count():
    with tf.Graph().as_default():
        _build(lambda x: resnet.forward_resnet(x, False, 56, 10), [None, 32, 32, 3])
        count = sum(int(np.prod(v.shape)) for v in tf1.trainable_variables())
    assert count == _resnet_param_count(56, 3, 10)


def test_resnet_rejects_bad_size():
    with tf.Graph().as_default():
        with pytest.raises(ValueError, match=r'resnet_size 21 .*20, 32, 44, 56, 110'):
            resnet.forward_resnet(tf1.placeholder(tf.float32, [None, 32, 32, 3]), True, 21, 10)


def test_resnet_uses_relu_conv_matmul_on_variables():
    with tf.Graph().as_default() as g:
        _build(lambda x: resnet.forward_resnet(x, True, 20, 10), [None, 32, 32, 3])
        ops = g.get_operations()
    assert sum(op.type == 'Conv2D' for op in ops) == 21
    assert sum(op.type == 'MatMul' for op in ops) == 1
    assert sum(op.type == 'Relu' for op in ops) == 19
    for op in ops:
        if op.type in ('Conv2D', 'MatMul'):
            weight = op.inputs[1].op
            assert weight.type == 'ReadVariableOp' and weight.inputs[0].op.name.endswith('weights')


def test_train_and_eval_graphs_have_identical_variables():
    names = []
    for is_training in (True, False):
        with tf.Graph().as_default():
            _build(lambda x: resnet.forward_resnet(x, is_training, 20, 10), [None, 28, 28, 1])
            names.append(sorted((v.op.name, tuple(v.shape.as_list()))
                                for v in tf1.global_variables()))
    assert names[0] == names[1]
    assert any(n.endswith('bn0/moving_mean') for n, _ in names[0])


def test_convnet_shapes_and_params():
    with tf.Graph().as_default():
        logits = _build(lambda x: convnet.forward_convnet(x, True), [None, 28, 28, 1])
        count = sum(int(np.prod(v.shape)) for v in tf1.trainable_variables())
    assert logits.shape.as_list() == [None, 10]
    expected = ((5 * 5 * 32 + 32) + (5 * 5 * 32 * 64 + 64)
                + (7 * 7 * 64 * 1024 + 1024) + (1024 * 10 + 10))
    assert count == expected


def test_batch_norm_train_updates_and_eval_independence(session_config):
    rng = np.random.RandomState(0)
    data = (rng.randn(8, 4, 4, 3) * 2 + 5).astype(np.float32)
    with tf.Graph().as_default():
        x = tf.constant(data)
        with tf1.variable_scope('m'):
            y_train = layers.batch_norm(x, True, 'bn', decay=0.9)
        with tf1.variable_scope('m', reuse=True):
            inp = tf1.placeholder(tf.float32, [None, 4, 4, 3])
            y_eval = layers.batch_norm(inp, False, 'bn')
        updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
        assert len(updates) == 2
        mean_var = [v for v in tf1.global_variables() if v.op.name == 'm/bn/moving_mean'][0]
        assert mean_var not in tf1.trainable_variables()
        with tf1.Session(config=session_config) as sess:
            sess.run(tf1.global_variables_initializer())
            before = sess.run(mean_var)
            out, _ = sess.run([y_train, updates])
            after = sess.run(mean_var)
            full = sess.run(y_eval, {inp: data})
            single = sess.run(y_eval, {inp: data[:1]})
    # Training mode normalises with batch statistics.
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(before, 0.0)
    np.testing.assert_allclose(after, 0.1 * data.mean(axis=(0, 1, 2)), rtol=1e-4)
    # Eval mode: an image's output does not depend on the rest of the batch.
    np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-5)


def test_resnet_eval_mode_is_per_example(session_config):
    rng = np.random.RandomState(1)
    data = rng.randn(4, 28, 28, 1).astype(np.float32)
    with tf.Graph().as_default():
        inp = tf1.placeholder(tf.float32, [None, 28, 28, 1])
        with tf1.variable_scope('model'):
            logits = resnet.forward_resnet(inp, False, 20, 10)
        with tf1.Session(config=session_config) as sess:
            sess.run(tf1.global_variables_initializer())
            full = sess.run(logits, {inp: data})
            single = sess.run(logits, {inp: data[2:3]})
    np.testing.assert_allclose(full[2:3], single, rtol=1e-4, atol=1e-4)
