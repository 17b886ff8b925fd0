"""Every weight grid x every bucket layout x {train, eval, export, reload}, bit for bit (tf.contrib.quantize's
matrix style): the weight a training graph feeds its op after two steps is the one the evaluation graph feeds,
the packed .tfq file stores (codes on the grid's levels) and a reload decodes; a float graph given the reloaded
weights computes the quantized evaluation graph's logits exactly."""
import os

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tfquant import weight_grids
from tfquant.config import BUCKET_TYPES
from tfquant.export import model_export, packed_reader

tf1 = tf.compat.v1
# The bits each grid is tried at (a width it takes, below 8 so the levels are few).
GRID_SETTINGS = {
    "minmax": dict(weight_bits=3),
    "symmetric": dict(weight_bits=3, weight_scheme="symmetric"),
    "lsq": dict(weight_bits=3, weight_range="lsq"),
    "ternary": dict(weight_bits=2, weight_range="ternary"),
    "binary": dict(weight_bits=1, weight_range="binary"),
}
# Every bucket layout the config names: 40 elements per bucket, or the smallest block size the runtimes' k-bit
# kernels take for 'block' (the conv's 9 input elements per output channel then make one short block, the fc's
# 144 nine blocks).
BUCKET_SIZES = {"block": 16}
LAYOUT_SETTINGS = {None: dict(use_buckets=False)}
LAYOUT_SETTINGS.update({kind: dict(use_buckets=True, bucket_type=kind, bucket_size=BUCKET_SIZES.get(kind, 40))
                        for kind in BUCKET_TYPES})


def _forward(images):
    with tf1.variable_scope("conv"):
        kernel = tf1.get_variable("weights", [3, 3, 1, 4], initializer=tf1.glorot_uniform_initializer())
        x = tf.nn.relu(tf.nn.conv2d(images, kernel, 1, "SAME"))
    with tf1.variable_scope("fc"):
        weights = tf1.get_variable("weights", [6 * 6 * 4, 3], initializer=tf1.glorot_uniform_initializer())
        return tf.matmul(tf.reshape(x, [-1, 6 * 6 * 4]), weights)


def _weights_read(graph, report):
    return {layer.weight_variable: graph.get_operation_by_name(layer.name).inputs[layer.input_index]
            for layer in report.weight_layers if layer.quantized}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    return rng.normal(size=(16, 6, 6, 1)).astype(np.float32), rng.integers(0, 3, 16)


def test_matrix_covers_every_grid():
    """A grid added to weight_grids must be added here (its bits) to be in the matrix."""
    assert set(GRID_SETTINGS) == set(weight_grids.GRIDS)


@pytest.mark.parametrize("layout", list(LAYOUT_SETTINGS), ids=lambda kind: kind or "none")
@pytest.mark.parametrize("grid_name", list(GRID_SETTINGS))
def test_grid_layout_train_eval_export_reload(tmp_path, data, grid_name, layout):
    images, labels = data
    config = tfquant.QuantConfig(quantize_all_layers=True, **GRID_SETTINGS[grid_name], **LAYOUT_SETTINGS[layout])
    grid = weight_grids.for_config(config)
    assert grid.name == grid_name
    # train: two steps, then the weights the training graph feeds its ops at the saved checkpoint
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(1)
        x, y = tf1.placeholder(tf.float32, [None, 6, 6, 1]), tf1.placeholder(tf.int64, [None])
        logits = _forward(x)
        report = tfquant.quantize_graph(graph, config, is_training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        train_op = tf1.train.GradientDescentOptimizer(0.1).minimize(loss)
        read = _weights_read(graph, report)
        saver = tf1.train.Saver()
        with new_session(graph) as sess:
            sess.run(tf1.global_variables_initializer())
            for _ in range(2):
                sess.run(train_op, {x: images, y: labels})
            trained = sess.run(read)
            checkpoint = saver.save(sess, os.path.join(str(tmp_path), "model.ckpt"), global_step=2)
    assert len(trained) == 2 and all(layer.bits == config.weight_bits for layer in report.weight_layers)
    assert all(bool(layer.range_variables) == grid.learned for layer in report.weight_layers)
    # eval: the evaluation graph feeds the same weights
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 6, 6, 1])
        logits = _forward(x)
        eval_report = tfquant.quantize_graph(graph, config, is_training=False)
        read = _weights_read(graph, eval_report)
        with new_session(graph) as sess:
            tf1.train.Saver().restore(sess, checkpoint)
            evaluated, eval_logits = sess.run([read, logits], {x: images})
    # export: the packed file's codes lie on the grid's levels
    path = tmp_path / "model.tfq"
    stats = model_export.pack_checkpoint(checkpoint, report, path)
    assert stats["quantized_tensors"] == 2 and stats["accounted_bits"] == stats["total_storage_bits"]
    stored = {t.name: t for t in packed_reader.read_packed_model(path)[0] if hasattr(t, "codes")}
    assert set(stored) == set(trained)
    for tensor in stored.values():
        codes = np.asarray(tensor.codes)
        top = {"symmetric": 2 ** config.weight_bits - 2, "ternary": 2}.get(grid_name, 2 ** config.weight_bits - 1)
        assert tensor.bits == config.weight_bits and codes.min() >= 0 and codes.max() <= top
    # reload: the decoded weights are the trained ones bit for bit, and give the evaluation graph's logits
    reloaded, _ = model_export.load_packed_weights(path)
    for name, value in trained.items():
        assert np.array_equal(value.view(np.uint32), evaluated[name].view(np.uint32)), ("eval", name)
        assert np.array_equal(value.view(np.uint32), reloaded[name].view(np.uint32)), ("reload", name)
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 6, 6, 1])
        logits = _forward(x)
        assigns = [v.assign(reloaded[v.op.name]) for v in tf1.global_variables()]
        with new_session(graph) as sess:
            sess.run(assigns)
            float_logits = sess.run(logits, {x: images})
    assert np.array_equal(float_logits.view(np.uint32), eval_logits.view(np.uint32))
