"""Ops tf2onnx has no handler for are replaced before conversion (onnx_export.with_converter_ops): TensorFlow's
exact GELU (Erfc) reaches onnxruntime as 1 - Erf and computes what TensorFlow computes."""
import numpy as np
import pytest
import tensorflow as tf

from tfquant.export import onnx_export

tf1 = tf.compat.v1
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def test_exact_gelu_converts_and_matches_tensorflow():
    rng = np.random.default_rng(0)
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 6], name="input")
        hidden = tf.matmul(x, tf.constant(rng.normal(size=(6, 5)).astype(np.float32)))
        tf.identity(tf.nn.gelu(hidden, approximate=False), name="logits")
    graph_def = graph.as_graph_def()
    assert any(node.op == "Erfc" for node in graph_def.node)  # TensorFlow's exact GELU
    images = (3 * rng.normal(size=(64, 6))).astype(np.float32)
    with tf1.Session(graph=graph) as sess:
        reference = sess.run("logits:0", {"input:0": images})
    model = onnx.load_from_string(onnx_export.convert(graph_def))
    assert "Erfc" not in {node.op_type for node in model.graph.node}
    # The k-bit export moves the model to opset 21: the version converter rejected the unknown Erfc op.
    model = onnx.version_converter.convert_version(model, 21)
    session = onnxruntime.InferenceSession(model.SerializeToString())
    (values,) = session.run(None, {session.get_inputs()[0].name: images})
    np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-6)
