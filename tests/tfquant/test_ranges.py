"""Activation ranges: batch min/max in training, moving averages saved and used at evaluation."""
import numpy as np
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tests.tfquant.reference import quantize_group


def _model(is_training, act_range="ema", bits=4, decay=0.9):
    """A tiny conv -> relu -> fc graph, rewritten for training or evaluation."""
    x = tf.compat.v1.placeholder(tf.float32, [None, 5, 5, 2])
    w = tf.compat.v1.get_variable("conv/weights", initializer=tf.compat.v1.random_normal_initializer(seed=3),
                                  shape=[3, 3, 2, 4])
    relu = tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME"), name="act")
    pooled = tf.reduce_mean(relu, [1, 2])
    logits = tf.matmul(pooled, tf.compat.v1.get_variable("fc/weights", [4, 3]))
    report = tfquant.quantize_graph(tf.compat.v1.get_default_graph(), tfquant.QuantConfig(
        weight_bits=32, activation_bits=bits, act_range=act_range, act_ema_decay=decay), is_training=is_training)
    return x, relu, pooled, logits, report


def test_training_uses_batch_range_and_tracks_ema_then_eval_uses_it(tmp_path, rng):
    batches = [rng.normal(size=(6, 5, 5, 2)).astype(np.float32) * (i + 1) for i in range(3)]
    train = tf.Graph()
    with train.as_default():
        x, relu, pooled, _, report = _model(is_training=True)
        assert [layer.range_variables for layer in report.activation_layers] == \
            [["act/act_quant/ema_min", "act/act_quant/ema_max"]]
        saver = tf.compat.v1.train.Saver()
        with new_session(train) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            ema_min = ema_max = None
            for batch in batches:
                raw, quantized = sess.run([relu, pooled], {x: batch})
                # The float relu output is the input of the quantization: recompute with NumPy.
                want = quantize_group(raw, 4).mean(axis=(1, 2))
                np.testing.assert_allclose(quantized, want, rtol=1e-5, atol=1e-5)
                lo, hi = raw.min(), raw.max()
                ema_min = lo if ema_min is None else 0.9 * ema_min + 0.1 * lo
                ema_max = hi if ema_max is None else 0.9 * ema_max + 0.1 * hi
            variables = {v.op.name: v for v in tf.compat.v1.global_variables()}
            stored = sess.run([variables["act/act_quant/ema_" + n] for n in ("min", "max", "steps")])
            np.testing.assert_allclose(stored[:2], [ema_min, ema_max], rtol=1e-5)
            assert stored[2] == 3
            path = saver.save(sess, str(tmp_path / "model.ckpt"))
    reader = tf.train.load_checkpoint(path)
    np.testing.assert_allclose(reader.get_tensor("act/act_quant/ema_max"), ema_max, rtol=1e-5)

    evaluation = tf.Graph()
    with evaluation.as_default():
        x, relu, pooled, _, _ = _model(is_training=False)
        with new_session(evaluation) as sess:
            tf.compat.v1.train.Saver().restore(sess, path)
            test = rng.normal(size=(4, 5, 5, 2)).astype(np.float32) * 3
            raw, together = sess.run([relu, pooled], {x: test})
            alone = np.concatenate([sess.run(pooled, {x: test[i:i + 1]}) for i in range(4)])
    # One image's output does not depend on the other images in its batch.
    np.testing.assert_array_equal(together, alone)
    # And equals the formula with the stored range, values outside it clipped to its ends.
    alpha = np.float32(ema_max - ema_min) + np.float32(1e-10)
    codes = np.round(np.clip((raw - np.float32(ema_min)) / alpha, 0, 1) * 15)
    np.testing.assert_allclose(together, (alpha * codes / 15 + ema_min).mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)


def test_batch_mode_evaluation_depends_on_the_batch(rng):
    g = tf.Graph()
    with g.as_default():
        x, _, pooled, _, report = _model(is_training=False, act_range="batch", bits=2)
        assert report.activation_layers[0].range_variables is None
        with new_session(g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            test = rng.normal(size=(4, 5, 5, 2)).astype(np.float32)
            test[3] *= 50  # one extreme image widens the batch range for everybody
            together = sess.run(pooled, {x: test})
            alone = sess.run(pooled, {x: test[:1]})
    assert not np.allclose(together[0], alone[0])


def test_eval_before_any_training_falls_back_to_batch_range(rng):
    g = tf.Graph()
    with g.as_default():
        x, relu, pooled, _, _ = _model(is_training=False)
        with new_session(g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            test = rng.normal(size=(3, 5, 5, 2)).astype(np.float32)
            raw, out = sess.run([relu, pooled], {x: test})
    np.testing.assert_allclose(out, quantize_group(raw, 4).mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)


def test_activation_gradient_is_straight_through(rng):
    g = tf.Graph()
    with g.as_default():
        x, relu, pooled, logits, _ = _model(is_training=True, bits=2)
        upstream = rng.normal(size=(2, 4)).astype(np.float32)
        loss = tf.reduce_sum(pooled * upstream)
        grad_relu, = tf.gradients(loss, [relu])
        with new_session(g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            value = sess.run(grad_relu, {x: rng.normal(size=(2, 5, 5, 2)).astype(np.float32)})
    # d loss / d relu through the mean over 5x5 positions, with the quantizer passing it unchanged.
    want = np.broadcast_to(upstream[:, None, None, :] / 25.0, (2, 5, 5, 4))
    np.testing.assert_allclose(value, want, rtol=1e-5)
