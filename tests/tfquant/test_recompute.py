"""Quantized inputs rebuilt in the backward pass (tfquant.recompute): the same gradients bit for bit, against a
NumPy straight-through reference, and a training step's peak memory no longer grows by one tensor per quantized
input (measured by the session's own allocator trace)."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tests.tfquant.reference import quantize_np
from tfquant import recompute

tf1 = tf.compat.v1
BATCH, SIZE, CHANNELS = 8, 16, 16


def _conv_net(images, layers=3):
    """conv3x3 -> ReLU, `layers` times, then the mean: every conv after the first reads a quantized ReLU."""
    x = images
    for index in range(layers):
        kernel = tf1.get_variable("w%d" % index, [3, 3, int(x.shape[-1]), CHANNELS],
                                  initializer=tf1.glorot_uniform_initializer(seed=index))
        x = tf.nn.relu(tf.nn.conv2d(x, kernel, [1, 1, 1, 1], "SAME"))
    return tf.reduce_mean(x, axis=[1, 2])


def _config(**settings):
    return tfquant.QuantConfig(weight_bits=4, activation_bits=4, use_buckets=True, bucket_type="channel", **settings)


def _training_step(images, quantized, monkeypatch=None):
    """(graph, loss, gradients by variable name, update ops) of the network, rewritten when `quantized`."""
    graph = tf.Graph()
    with graph.as_default():
        inputs = tf.constant(images)
        logits = _conv_net(inputs)
        if quantized:
            logits = tfquant.quantize_graph(graph, _config(), is_training=True).output(logits)
        loss = tf.reduce_sum(logits * tf.constant(np.linspace(-1.0, 1.0, CHANNELS, dtype=np.float32)))
        variables = tf1.trainable_variables()
        gradients = dict(zip([v.op.name for v in variables], tf1.gradients(loss, variables)))
    return graph, loss, gradients


def _run(graph, fetches):
    with graph.as_default():
        init = tf1.global_variables_initializer()
        updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
    with new_session(graph) as sess:
        sess.run(init)
        return sess.run(fetches)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)


def test_readers_of_quantized_tensors_are_marked(images):
    graph, _, gradients = _training_step(images, quantized=True)
    marked = [op for op in graph.get_operations() if op.node_def.attr.get("_gradient_op_type") is not None
              and op.get_attr("_gradient_op_type") == recompute.GRADIENT_TYPE.encode()]
    # The convolutions reading a quantized ReLU (the first reads the images); the mean's gradient reads no value.
    assert sorted(op.name for op in marked) == ["Conv2D_1", "Conv2D_2"]
    # Their gradients read rebuilt tensors, never the forward pass's joins; the first conv's gradient is untouched.
    backward = [op for op in graph.get_operations() if op.type in ("Conv2DBackpropFilter", "Conv2DBackpropInput")]
    assert len(backward) == 6
    for op in backward:
        read = [tensor.op.type for tensor in op.inputs]
        assert "IdentityN" not in read, (op.name, read)
    filters = {op.name.split("/")[1]: op for op in backward if op.type == "Conv2DBackpropFilter"}
    assert filters["Conv2D_grad"].inputs[0].op.type == "Const"  # the images
    for name in ("Conv2D_1_grad", "Conv2D_2_grad"):
        # The rebuilt quantized ReLU: the chain's last op (+ beta), built under the conv's gradient scope.
        rebuilt = filters[name].inputs[0]
        assert rebuilt.op.type == "AddV2" and rebuilt.op.name.startswith("gradients/" + name), rebuilt.name


def test_gradients_are_bit_for_bit_those_without_recomputation(images, monkeypatch):
    graph, loss, gradients = _training_step(images, quantized=True)
    got_loss, got = _run(graph, [loss, gradients])
    monkeypatch.setattr(recompute, "recompute_in_backward", lambda g: 0)
    graph, loss, gradients = _training_step(images, quantized=True)
    assert not any(op.node_def.attr.get(recompute.ORIGINAL_GRADIENT_ATTR) for op in graph.get_operations())
    want_loss, want = _run(graph, [loss, gradients])
    assert np.float32(got_loss).view(np.int32) == np.float32(want_loss).view(np.int32)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name].view(np.int32), want[name].view(np.int32), err_msg=name)


def test_one_layer_gradients_match_a_numpy_straight_through_reference(rng):
    """A 1x1 convolution y = Q(relu(x)) . Q(W): dL/dW = Q(a)^T r, dL/dx = (r Q(W)^T) * [x > 0] (a = relu(x))."""
    x_value = rng.normal(size=(4, 5, 5, 6)).astype(np.float32)
    w_value = rng.normal(size=(1, 1, 6, 3)).astype(np.float32)
    r_value = rng.normal(size=(4, 5, 5, 3)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.constant(x_value)
        kernel = tf1.get_variable("w", initializer=w_value)
        y = tf.nn.conv2d(tf.nn.relu(x), kernel, [1, 1, 1, 1], "VALID")
        tfquant.quantize_graph(graph, _config(quantize_all_layers=True), is_training=True)
        loss = tf.reduce_sum(y * tf.constant(r_value))
        grad_x, grad_w = tf1.gradients(loss, [x, kernel])
        assert any(op.type == "Conv2D" and op.get_attr("_gradient_op_type") == recompute.GRADIENT_TYPE.encode()
                   for op in graph.get_operations())
    got_x, got_w = _run(graph, [grad_x, grad_w])
    relu = np.maximum(x_value, 0.0)
    quantized_relu = quantize_np(relu, 4).reshape(-1, 6)
    quantized_w = quantize_np(w_value, 4, "channel", channel_axes=(3,)).reshape(6, 3)
    residual = r_value.reshape(-1, 3)
    np.testing.assert_allclose(got_w.reshape(6, 3), quantized_relu.T @ residual, rtol=1e-5, atol=1e-5)
    want_x = (residual @ quantized_w.T).reshape(x_value.shape) * (x_value > 0)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)


def _peak_allocated_bytes(graph, fetch):
    """Peak live bytes of one traced run of `fetch`, from the allocator records of the session's trace."""
    with graph.as_default():
        init = tf1.global_variables_initializer()
    with new_session(graph) as sess:
        sess.run(init)
        sess.run(fetch)
        metadata = tf1.RunMetadata()
        sess.run(fetch, options=tf1.RunOptions(trace_level=tf1.RunOptions.FULL_TRACE), run_metadata=metadata)
    records = sorted((r.alloc_micros, -r.alloc_bytes, r.alloc_bytes) for dev in metadata.step_stats.dev_stats
                     for node in dev.node_stats for memory in node.memory for r in memory.allocation_records)
    live = peak = 0
    for _, _, size in records:
        live += size
        peak = max(peak, live)
    return peak


def test_peak_memory_of_a_training_step_stays_near_float(rng):
    """Before recomputation the quantized step kept each quantized ReLU and weight besides the float ones."""
    global SIZE  # pylint: disable=global-statement
    images = rng.normal(size=(BATCH, 64, 64, 3)).astype(np.float32)
    peaks = {}
    for quantized in (False, True):
        graph = tf.Graph()
        with graph.as_default():
            logits = _conv_net(tf.constant(images), layers=4)
            if quantized:
                logits = tfquant.quantize_graph(graph, _config(), is_training=True).output(logits)
            loss = tf.reduce_sum(logits)
            step = tf1.train.GradientDescentOptimizer(0.01).minimize(loss)
            with tf.control_dependencies([step] + tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
                fetch = tf.no_op()
        peaks[quantized] = _peak_allocated_bytes(graph, fetch)
    activation = BATCH * 64 * 64 * CHANNELS * 4
    # Kept quantized ReLUs would add three activations; a rebuilt one lives only around its own layer's gradient.
    assert peaks[True] - peaks[False] < activation, (peaks, activation)
