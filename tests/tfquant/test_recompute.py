"""Quantized inputs rebuilt in the backward pass (tfquant.recompute): the same gradients bit for bit, against a
NumPy straight-through reference, and a training step's peak memory no longer grows by one tensor per quantized
input (measured by the session's own allocator trace)."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tests.tfquant.reference import quantize_np
from tfquant import kernels, recompute

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


RECOMPUTE = {False: "none", None: "weights", True: "all"}


def _config(**settings):
    return tfquant.QuantConfig(weight_bits=4, activation_bits=4, use_buckets=True, bucket_type="channel", **settings)


def _training_step(images, activations=None):
    """(graph, loss, gradients by variable name) of the network rewritten with every layer quantized.

    activations: None rebuilds the quantized weights (recompute_quantized='weights'); False rebuilds nothing
    (the default); True rebuilds the quantized activations too ('all').
    """
    graph = tf.Graph()
    with graph.as_default():
        logits = _conv_net(tf.constant(images))
        config = _config(quantize_all_layers=True, recompute_quantized=RECOMPUTE[activations])
        logits = tfquant.quantize_graph(graph, config, is_training=True).output(logits)
        loss = tf.reduce_sum(logits * tf.constant(np.linspace(-1.0, 1.0, CHANNELS, dtype=np.float32)))
        variables = tf1.trainable_variables()
        gradients = dict(zip([v.op.name for v in variables], tf1.gradients(loss, variables)))
    return graph, loss, gradients


def _run(graph, fetches):
    with graph.as_default():
        init = tf1.global_variables_initializer()
    with new_session(graph) as sess:
        sess.run(init)
        return sess.run(fetches)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)


def _marks(graph):
    return {op.name: list(recompute.recomputed_inputs(op)) for op in graph.get_operations()
            if recompute.recomputed_inputs(op)}


def _backward_reads(graph):
    """{(gradient op type, forward conv name): [types of the ops producing its inputs]}."""
    return {(op.type, op.name.split("/")[1][:-len("_grad")]): [t.op for t in op.inputs]
            for op in graph.get_operations() if op.type in ("Conv2DBackpropFilter", "Conv2DBackpropInput")}


@pytest.mark.parametrize("activations", [None, True])
def test_marked_readers_read_rebuilt_tensors_in_the_backward_pass(images, activations):
    graph, _, _ = _training_step(images, activations)
    # Every conv reads a quantized weight (input 1); the second and third read a quantized ReLU (input 0), and
    # the mean that reads the last ReLU is no matmul-like reader.
    want = {"Conv2D": [1], "Conv2D_1": [0, 1] if activations else [1], "Conv2D_2": [0, 1] if activations else [1]}
    assert _marks(graph) == want
    reads = _backward_reads(graph)
    assert len(reads) == 6
    for (op_type, conv), producers in reads.items():
        forward = graph.get_operation_by_name(conv)
        # The filter gradient reads the layer input, the input gradient the weight: rebuilt where marked, the
        # rebuilt chain ending with its '+ beta' (or, for an activation of a training graph, the fused kernel of
        # tfquant.kernels doing the whole chain) built under the conv's gradient scope.
        index = 0 if op_type == "Conv2DBackpropFilter" else 1
        read = producers[0] if index == 0 else producers[1]
        if index in want[conv]:
            last = {"AddV2", kernels.QUANTIZE_TYPE} if index == 0 else {"AddV2"}
            assert read.type in last and read.name.startswith("gradients/%s_grad/" % conv), read.name
        else:
            assert read is forward.inputs[index].op


def test_gradients_are_bit_for_bit_those_without_recomputation(images):
    results = {}
    for activations in (False, None, True):
        graph, loss, gradients = _training_step(images, activations)
        assert bool(_marks(graph)) == (activations is not False)
        results[activations] = _run(graph, [loss, gradients])
    want_loss, want = results[False]
    for activations in (None, True):
        got_loss, got = results[activations]
        assert np.float32(got_loss).view(np.int32) == np.float32(want_loss).view(np.int32)
        assert sorted(got) == sorted(want) and len(want) == 3
        for name in want:
            np.testing.assert_array_equal(got[name].view(np.int32), want[name].view(np.int32), err_msg=name)


def _depthwise_dense_gradients(images, activations):
    """Gradients of conv -> ReLU -> depthwise conv -> ReLU -> mean -> dense, every layer quantized."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.nn.relu(tf.nn.conv2d(tf.constant(images), tf1.get_variable(
            "w0", [3, 3, 3, 8], initializer=tf1.glorot_uniform_initializer(seed=1)), [1, 1, 1, 1], "SAME"))
        x = tf.nn.relu(tf.nn.depthwise_conv2d(x, tf1.get_variable(
            "dw", [3, 3, 8, 1], initializer=tf1.glorot_uniform_initializer(seed=2)), [1, 1, 1, 1], "SAME"))
        logits = tf.matmul(tf.reduce_mean(x, axis=[1, 2]), tf1.get_variable(
            "fc", [8, 5], initializer=tf1.glorot_uniform_initializer(seed=3)))
        config = _config(quantize_all_layers=True, recompute_quantized=RECOMPUTE[activations])
        logits = tfquant.quantize_graph(graph, config, is_training=True).output(logits)
        marks = _marks(graph)
        loss = tf.reduce_sum(logits * tf.constant(np.arange(5, dtype=np.float32)))
        variables = tf1.trainable_variables()
        gradients = tf1.gradients(loss, variables)
    return marks, _run(graph, gradients)


def test_depthwise_and_matmul_readers_give_the_same_gradients(images):
    _, want = _depthwise_dense_gradients(images, activations=False)
    marks, got = _depthwise_dense_gradients(images, activations=True)
    # The depthwise conv reads a quantized ReLU and weight; the matmul a quantized weight (the mean stays float).
    assert sorted((name.split("/")[-1], indices) for name, indices in marks.items()) == [
        ("Conv2D", [1]), ("MatMul", [1]), ("depthwise", [0, 1])], marks
    assert len(got) == len(want) == 3
    for got_gradient, want_gradient in zip(got, want):
        np.testing.assert_array_equal(got_gradient.view(np.int32), want_gradient.view(np.int32))


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
        recompute.recompute_in_backward(graph, activations=True)
        loss = tf.reduce_sum(y * tf.constant(r_value))
        grad_x, grad_w = tf1.gradients(loss, [x, kernel])
        assert _marks(graph) == {"Conv2D": [0, 1]}
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
    """Without recomputation the quantized step kept each quantized ReLU and weight besides the float ones."""
    images = rng.normal(size=(BATCH, 64, 64, 3)).astype(np.float32)
    peaks = {}
    for quantized in (False, True):
        graph = tf.Graph()
        with graph.as_default():
            logits = _conv_net(tf.constant(images), layers=4)
            if quantized:
                logits = tfquant.quantize_graph(graph, _config(), is_training=True).output(logits)
                recompute.recompute_in_backward(graph, activations=True)
            loss = tf.reduce_sum(logits)
            step = tf1.train.GradientDescentOptimizer(0.01).minimize(loss)
            with tf.control_dependencies([step] + tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
                fetch = tf.no_op()
        peaks[quantized] = _peak_allocated_bytes(graph, fetch)
    activation = BATCH * 64 * 64 * CHANNELS * 4
    # Kept quantized ReLUs would add three activations; a rebuilt one lives only around its own layer's gradient,
    # where the executor's order may or may not overlap it with the peak (one activation and a few bytes seen).
    assert peaks[True] - peaks[False] < 2 * activation, (peaks, activation)


def test_nothing_is_rebuilt_unless_asked_and_bad_choices_are_refused(images):
    graph = tf.Graph()
    with graph.as_default():
        _conv_net(tf.constant(images))
        report = tfquant.quantize_graph(graph, _config(quantize_all_layers=True), is_training=True)
    assert len([layer for layer in report.quantized_layers if layer.kind == "weight"]) == 3
    assert _marks(graph) == {}
    with graph.as_default():
        recompute.recompute_in_backward(graph)  # what recompute_quantized='weights' would have done
    assert _marks(graph) == {"Conv2D": [1], "Conv2D_1": [1], "Conv2D_2": [1]}
    with pytest.raises(ValueError, match="recompute_quantized='some' is not valid; expected one of none, weights, "
                                         "all"):
        _config(recompute_quantized="some")
