"""Batch-norm folding against NumPy: eval graphs, training graphs with the correction, the freeze switch."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from nets import layers
from tests.conftest import new_session

tf1 = tf.compat.v1
EPS = 1e-3


def _conv_np(x, w):
    """VALID, stride-1 NHWC convolution."""
    kh, kw = w.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # N,H',W',C,kh,kw
    return np.einsum("nhwcij,ijco->nhwo", windows.astype(np.float64), w.astype(np.float64))


def _depthwise_np(x, w):
    kh, kw = w.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    out = np.einsum("nhwcij,ijcm->nhwcm", windows.astype(np.float64), w.astype(np.float64))
    return out.reshape(out.shape[:3] + (-1,))


def _sym_np(w, bits, axis):
    level = 2 ** (bits - 1) - 1
    axes = tuple(a for a in range(w.ndim) if a != axis)
    step = np.abs(w).max(axis=axes, keepdims=True) / level
    return np.clip(np.round(w / step), -level, level) * step


class _Model:
    """conv 3x3 (VALID) -> fused batch norm (nets.layers) -> relu, with non-trivial BN state."""

    def __init__(self, graph, rng, is_training, channels=5, depthwise=False):
        self.x_value = rng.normal(size=(6, 7, 7, 3)).astype(np.float32)
        shape = (3, 3, 3, 2) if depthwise else (3, 3, 3, channels)
        self.w_value = rng.normal(size=shape).astype(np.float32) * 0.5
        out = 6 if depthwise else channels
        self.gamma = rng.uniform(0.5, 2.0, out).astype(np.float32) * rng.choice([-1, 1], out)
        self.beta = rng.normal(size=out).astype(np.float32)
        self.mean = rng.normal(size=out).astype(np.float32)
        self.var = rng.uniform(0.5, 4.0, out).astype(np.float32)
        self.x = tf.constant(self.x_value)
        with tf1.variable_scope("layer"):
            w = tf1.get_variable("weights", initializer=self.w_value)
            if depthwise:
                conv = tf.nn.depthwise_conv2d(self.x, w, [1, 1, 1, 1], "VALID")
            else:
                conv = tf.nn.conv2d(self.x, w, 1, "VALID")
        self.conv_op = conv.op
        normed = layers.batch_norm(conv, is_training, "bn", eps=EPS)
        self.y = tf.identity(normed, name="y")

    def set_state(self, sess):
        values = {"bn/gamma": self.gamma, "bn/beta": self.beta, "bn/moving_mean": self.mean,
                  "bn/moving_variance": self.var}
        for variable in tf1.global_variables():
            if variable.op.name in values:
                variable.load(values[variable.op.name], sess)

    @property
    def multiplier(self):
        return self.gamma / np.sqrt(self.var.astype(np.float64) + EPS)


def _run(graph, model, fetches, step=None):
    with new_session(graph) as sess:
        sess.run(tf1.global_variables_initializer())
        model.set_state(sess)
        if step is not None:
            tf1.train.get_global_step(graph).load(step, sess)
        return sess.run(fetches)


@pytest.mark.parametrize("depthwise", [False, True])
def test_eval_folded_equals_unfolded_and_numpy(graph, rng, depthwise):
    model = _Model(graph, rng, is_training=False, depthwise=depthwise)
    config = tfquant.QuantConfig(weight_bits=32, fold_batch_norms=True)
    report = tfquant.quantize_graph(graph, config, is_training=False)
    assert not report.notes
    weight, y = _run(graph, model, [model.conv_op.inputs[1], model.y])
    m = model.multiplier
    w_folded = model.w_value * (m.reshape(3, 2) if depthwise else m)
    np.testing.assert_allclose(weight, w_folded, rtol=1e-5)
    conv = (_depthwise_np if depthwise else _conv_np)(model.x_value, model.w_value)
    unfolded = (conv - model.mean) * m + model.beta
    np.testing.assert_allclose(y, unfolded, rtol=1e-4, atol=1e-4)
    # The batch norm is bypassed: the layer is conv(x, W m) + bias, as an inference engine runs it.
    bn = [op for op in graph.get_operations() if op.type.startswith("FusedBatchNorm")]
    assert bn and all(not op.outputs[0].consumers() for op in bn)


def test_eval_folded_weight_is_quantized(graph, rng):
    model = _Model(graph, rng, is_training=False)
    config = tfquant.QuantConfig(weight_bits=4, quantize_all_layers=True, fold_batch_norms=True,
                                 weight_scheme="symmetric", use_buckets=True, bucket_type="channel")
    tfquant.quantize_graph(graph, config, is_training=False)
    weight, y = _run(graph, model, [model.conv_op.inputs[1], model.y])
    w_q = _sym_np(model.w_value * model.multiplier, 4, 3)
    np.testing.assert_allclose(weight, w_q, rtol=1e-5, atol=1e-6)
    want = _conv_np(model.x_value, w_q) + (model.beta - model.mean * model.multiplier)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_training_uses_batch_statistics_with_the_correction(graph, rng):
    model = _Model(graph, rng, is_training=True)
    config = tfquant.QuantConfig(weight_bits=8, quantize_all_layers=True, fold_batch_norms=True,
                                 weight_scheme="symmetric", use_buckets=True, bucket_type="channel")
    tfquant.quantize_graph(graph, config, is_training=True)
    updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
    weight, y, *_ = _run(graph, model, [model.conv_op.inputs[1], model.y] + updates)
    m = model.multiplier
    w_q = _sym_np(model.w_value * m, 8, 3)
    # The weight quantized is folded with the moving variance, not the batch's; the conv reads it
    # divided by m, so the batch norm normalizes the unfolded layer's output.
    np.testing.assert_allclose(weight, w_q / m, rtol=1e-5, atol=1e-6)
    conv = _conv_np(model.x_value, w_q)
    batch = conv / m
    mu_b, var_b = batch.mean(axis=(0, 1, 2)), batch.var(axis=(0, 1, 2))
    sigma_b, sigma_mv = np.sqrt(var_b + EPS), np.sqrt(model.var + EPS)
    want = conv * (sigma_mv / sigma_b) + (model.beta - mu_b * model.gamma / sigma_b)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=2e-4)
    # The correction factor matters here: without it the output would differ.
    assert np.max(np.abs(sigma_mv / sigma_b - 1)) > 0.1
    # The division by m is on the weight: the batch norm reads the conv's output itself (no
    # activation-size multiply per layer in the training step).
    batch_norm, = [op for op in graph.get_operations() if op.type == "FusedBatchNormV3"]
    assert batch_norm.inputs[0] is model.conv_op.outputs[0]
    # Float folding in training reproduces the unfolded batch norm exactly.


def test_training_float_fold_equals_unfolded_batch_norm(graph, rng):
    model = _Model(graph, rng, is_training=True)
    tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=32, fold_batch_norms=True), is_training=True)
    loss = tf.reduce_sum(tf.square(model.y))
    w_var = [v for v in tf1.trainable_variables() if v.op.name == "layer/weights"][0]
    grad, = tf.gradients(loss, [w_var])
    y, grad_value = _run(graph, model, [model.y, grad])
    conv = _conv_np(model.x_value, model.w_value)
    mu_b, var_b = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    want = (conv - mu_b) / np.sqrt(var_b + EPS) * model.gamma + model.beta
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=2e-4)
    # Same gradient as the unfolded graph (built separately).
    reference = tf.Graph()
    with reference.as_default():
        ref_model = _Model(reference, np.random.default_rng(20261122), is_training=True)
        ref_w = [v for v in tf1.trainable_variables() if v.op.name == "layer/weights"][0]
        ref_grad, = tf.gradients(tf.reduce_sum(tf.square(ref_model.y)), [ref_w])
        ref_value, = _run(reference, ref_model, [ref_grad])
    np.testing.assert_allclose(grad_value, ref_value, rtol=1e-3, atol=1e-3 * np.abs(ref_value).max())


def test_after_freeze_delay_training_uses_moving_statistics(graph, rng):
    model = _Model(graph, rng, is_training=True)
    config = tfquant.QuantConfig(weight_bits=32, fold_batch_norms=True, freeze_bn_delay=10)
    tfquant.quantize_graph(graph, config, is_training=True)
    conv = _conv_np(model.x_value, model.w_value)
    before, = _run(graph, model, [model.y], step=9)
    after, = _run(graph, model, [model.y], step=10)
    mu_b, var_b = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    np.testing.assert_allclose(before, (conv - mu_b) / np.sqrt(var_b + EPS) * model.gamma + model.beta,
                               rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(after, (conv - model.mean) * model.multiplier + model.beta, rtol=1e-4, atol=2e-4)


def _gamma_gradient(graph, model, step=None):
    """d(sum(y * R))/d gamma and the batch norm's input, R a fixed random tensor."""
    weights = np.random.default_rng(7).normal(size=model.y.shape.as_list()).astype(np.float32)
    gamma = [v for v in tf1.trainable_variables() if v.op.name == "bn/gamma"][0]
    grad, = tf.gradients(tf.reduce_sum(model.y * weights), [gamma])
    batch_norm = [op for op in graph.get_operations() if op.type == "FusedBatchNormV3"][0]
    value, bn_input = _run(graph, model, [grad, batch_norm.inputs[0]], step=step)
    return value, bn_input, weights


def test_training_gamma_learns_through_the_batch_norm_before_the_freeze(graph, rng):
    # 2-bit weights: conv(x, Q(W m)) / m differs from conv(x, W), so a gradient through m would show.
    model = _Model(graph, rng, is_training=True)
    config = tfquant.QuantConfig(weight_bits=2, quantize_all_layers=True, fold_batch_norms=True,
                                 weight_scheme="symmetric", use_buckets=True, bucket_type="channel",
                                 freeze_bn_delay=10)
    tfquant.quantize_graph(graph, config, is_training=True)
    grad, bn_input, weights = _gamma_gradient(graph, model, step=9)
    batch = _conv_np(model.x_value, _sym_np(model.w_value * model.multiplier, 2, 3)) / model.multiplier
    np.testing.assert_allclose(bn_input, batch, rtol=1e-4, atol=1e-4)
    normalized = (batch - batch.mean(axis=(0, 1, 2))) / np.sqrt(batch.var(axis=(0, 1, 2)) + EPS)
    np.testing.assert_allclose(grad, (weights * normalized).sum(axis=(0, 1, 2)), rtol=1e-3, atol=1e-3)


def test_training_gamma_learns_through_the_folded_weight_after_the_freeze(graph, rng):
    model = _Model(graph, rng, is_training=True)
    config = tfquant.QuantConfig(weight_bits=32, fold_batch_norms=True, freeze_bn_delay=10)
    tfquant.quantize_graph(graph, config, is_training=True)
    grad, _, weights = _gamma_gradient(graph, model, step=10)
    # y = (conv(x, W) - moving_mean) * gamma / sigma_mv + beta.
    conv = _conv_np(model.x_value, model.w_value)
    want = (weights * (conv - model.mean)).sum(axis=(0, 1, 2)) / np.sqrt(model.var.astype(np.float64) + EPS)
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-3)


def test_matmul_and_unfused_eval_pattern_fold(graph, rng):
    x_value = rng.normal(size=(8, 5)).astype(np.float32)
    w_value = rng.normal(size=(5, 4)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    mean, var = rng.normal(size=4).astype(np.float32), rng.uniform(0.5, 3, 4).astype(np.float32)
    w = tf1.get_variable("w", initializer=w_value)
    h = tf.matmul(tf.constant(x_value), w, name="mm")
    y = tf.nn.batch_normalization(h, tf.constant(mean), tf.constant(var), tf.constant(beta),
                                  tf.constant(gamma), EPS)
    report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=32, fold_batch_norms=True),
                                    is_training=False)
    assert not report.notes
    with new_session(graph) as sess:
        sess.run(tf1.global_variables_initializer())
        weight, got = sess.run([graph.get_operation_by_name("mm").inputs[1], y])
    m = gamma / np.sqrt(var.astype(np.float64) + EPS)
    np.testing.assert_allclose(weight, w_value * m, rtol=1e-5)
    np.testing.assert_allclose(got, (x_value @ w_value - mean) * m + beta, rtol=1e-4, atol=1e-4)


def test_unfused_training_pattern_is_named_not_folded(graph, rng):
    x = tf.constant(rng.normal(size=(8, 5)).astype(np.float32))
    w = tf1.get_variable("w", initializer=rng.normal(size=(5, 4)).astype(np.float32))
    h = tf.matmul(x, w, name="mm")
    mean, var = tf.nn.moments(h, [0])
    tf.nn.batch_normalization(h, mean, var, tf.zeros([4]), tf.ones([4]), EPS)
    report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=32, fold_batch_norms=True),
                                    is_training=True)
    assert any("mm" in note and "not folded" in note for note in report.notes)
    assert graph.get_operation_by_name("mm").inputs[1].op.type in ("ReadVariableOp", "Identity")


def test_each_moving_statistic_is_found_from_its_own_batch_statistic(graph):
    # The variance's update sits one op deeper than the mean's (as a Keras 3 rebuild once wrote them): the search
    # from the variance must not reach the mean's update through the batch norm's other outputs.
    from tfquant import fold
    x = tf.constant(np.ones((2, 3, 3, 4), np.float32))
    with tf1.variable_scope("bn"):
        mean_var = tf1.get_variable("moving_mean", initializer=np.zeros(4, np.float32), trainable=False)
        variance_var = tf1.get_variable("moving_variance", initializer=np.ones(4, np.float32), trainable=False)
    _, batch_mean, batch_variance = tf1.nn.fused_batch_norm(x, tf.ones(4), tf.zeros(4), is_training=True)[:3]
    tf1.assign_sub(mean_var, (mean_var - batch_mean) * 0.1)
    tf1.assign_sub(variance_var, (variance_var - tf.identity(batch_variance)) * 0.1)

    def variable_of(tensor):
        while tensor.op.type != "VarHandleOp":
            tensor = tensor.op.inputs[0]
        return tensor.op.name

    assert variable_of(fold._moving_statistic(graph, batch_mean)) == "bn/moving_mean"
    assert variable_of(fold._moving_statistic(graph, batch_variance)) == "bn/moving_variance"
