"""A model file's int8 TFLite and ONNX files compute what its quantized TF graph computes: a frozen graph (conv +
bias + frozen batch norm, a depthwise convolution whose channels have scales 300x apart, dense) imported as
nets/model_file_run.py imports it, quantized for deployment (symmetric per-channel W8A8, every int8 tensor
trained), exported, and every file compared image by image with the quantized TF graph run by TensorFlow."""
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from nets.model_formats import graph_import, load_file_graph
from tfquant.export import inference_graph, onnx_export, run_directory

tf1 = tf.compat.v1
SHAPE = [10, 10, 1]
CLASSES = 5
CONFIG = tfquant.QuantConfig(weight_bits=8, activation_bits=8, quantize_all_layers=True, use_buckets=True,
                             bucket_type="channel", weight_scheme="symmetric", quantize_layer_outputs=True)


def _write_frozen_graph(path, rng):
    """conv + bias + fused batch norm + relu, depthwise (channel scales 0.01 .. 3) + relu, flatten, dense + bias."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None] + SHAPE, name="images")
        x = tf.nn.bias_add(tf.nn.conv2d(images, tf.constant(rng.normal(0, 0.5, (3, 3, 1, 6)).astype(np.float32)),
                                        1, "SAME"), tf.constant(rng.normal(0, 0.1, 6).astype(np.float32)))
        x, _, _ = tf1.nn.fused_batch_norm(
            x, tf.constant(rng.uniform(0.5, 1.5, 6).astype(np.float32)),
            tf.constant(rng.normal(0, 0.1, 6).astype(np.float32)), tf.constant(np.zeros(6, np.float32)),
            tf.constant(np.ones(6, np.float32)), epsilon=1e-3, is_training=False)
        # One range for all channels (what the export gave a depthwise kernel before) leaves the small ones a
        # few levels: their trained per-channel grid is what the int8 files must hold.
        scales = np.array([0.01, 0.03, 0.1, 0.3, 1.0, 3.0], np.float32)
        depthwise = (rng.normal(0, 1, (3, 3, 6, 1)) * scales[None, None, :, None]).astype(np.float32)
        x = tf.nn.relu(tf.nn.depthwise_conv2d(tf.nn.relu(x), tf.constant(depthwise), [1, 2, 2, 1], "SAME"))
        x = tf.reshape(x * (1.0 / scales), [-1, 5 * 5 * 6])
        dense = rng.normal(0, 0.3, (5 * 5 * 6, CLASSES)).astype(np.float32)
        tf.identity(tf.matmul(x, tf.constant(dense)) + tf.constant(rng.normal(0, 0.1, CLASSES).astype(np.float32)),
                    name="scores")
    with open(path, "wb") as handle:
        handle.write(graph.as_graph_def().SerializeToString())


@pytest.fixture(scope="module", params=[8, 4], ids=["W8A8", "W4A8"])
def exported(tmp_path_factory, request):
    """W8A8, and W4A8, whose ONNX file stores the kernels as 4-bit codes (the k-bit export)."""
    config = dataclasses.replace(CONFIG, weight_bits=request.param)
    directory = tmp_path_factory.mktemp("model_file_export")
    rng = np.random.default_rng(0)
    _write_frozen_graph(str(directory / "model.pb"), rng)
    prepared = graph_import.prepare(load_file_graph(str(directory / "model.pb"), "frozen_graph"))

    def forward(images):
        with tf1.variable_scope("model", reuse=tf1.AUTO_REUSE):
            return graph_import.import_graph(prepared, images)

    run = directory / "run"
    run.mkdir()
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None] + SHAPE)
        logits = forward(images)
        report = tfquant.quantize_graph(graph, config, is_training=True)
        logits = report.output(logits)
        saver = tf1.train.Saver()
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            for _ in range(3):  # forward passes record the moving-average ranges, as training would
                sess.run(logits, {images: rng.uniform(0, 1, [64] + SHAPE).astype(np.float32)})
            saver.save(sess, str(run / "model.ckpt"), global_step=1)
    (run / "quant_report.json").write_text(report.to_json())
    inference_graph.save_inference_graph(str(run), forward, [None] + SHAPE)
    test_images = rng.uniform(0, 1, [300] + SHAPE).astype(np.float32)
    labels = rng.integers(0, CLASSES, 300)
    onnx = onnx_export.available()
    result = run_directory.export_run_directory(
        str(run), str(directory / "export"), int8=True, onnx=onnx, test_data=(test_images, labels),
        calibration_images=test_images[:20], latency_images=0)
    return dict(result=result, onnx=onnx, run=run, export=directory / "export", images=test_images)


def test_depthwise_kernel_keeps_its_trained_per_channel_grid(exported):
    weights = {w["layer"].rsplit("/", 1)[-1]: w for w in exported["result"]["trained_ranges"]["weights"]}
    assert weights["depthwise"]["int8"] == "exact", weights["depthwise"]
    assert exported["result"]["trained_ranges"]["calibrated_tensors"] == []


@pytest.mark.parametrize("kind", ["tflite_int8", "onnx"])
def test_exported_file_agrees_with_the_quantized_tf_graph(exported, kind):
    if kind == "onnx" and not exported["onnx"]:
        pytest.skip("onnx, tf2onnx or onnxruntime not installed")
    result = exported["result"]
    # The reference recomputed here: the run's quantized evaluation graph restored from its checkpoint.
    report = tfquant.report.load_report(str(exported["run"] / "quant_report.json"))
    saved = inference_graph.InferenceGraph(os.path.join(str(exported["run"]), inference_graph.INFERENCE_GRAPH_NAME))
    reference = run_directory._quantized_checkpoint_logits(  # pylint: disable=protected-access
        saved.build_forward, tf.train.latest_checkpoint(str(exported["run"])),
        tfquant.report.config_from_report(report), exported["images"])
    if kind == "onnx":
        logits = onnx_export.run_onnx((exported["export"] / "model.onnx").read_bytes(), exported["images"])
    else:
        from tfquant.export import tflite_export
        logits = tflite_export.run_tflite(str(exported["export"] / "model_int8.tflite"), exported["images"])
    agreement = float(np.mean(logits.argmax(1) == reference.argmax(1)))
    assert agreement == pytest.approx(result["agreement_with_quantized_tf"][kind])
    assert agreement >= 0.99, (agreement, json.dumps(result["disagreements_with_quantized_tf"][kind]))
