"""A model file imported into a tf.compat.v1 graph (nets.model_formats) computes what the file computes, with its
weights as variables that tfquant finds and quantizes."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from nets.model_formats import detect_format, graph_import, load_file_graph
from tests.nets import model_file_fixtures as fx

tf1 = tf.compat.v1


@pytest.fixture(scope="module")
def files():
    shared = fx.shared_files()
    directory, images = shared["dir"], shared["x_test"][:50]
    module = tf.saved_model.load(str(directory / "module_sm")).signatures["serving_default"]
    exported = tf.saved_model.load(str(directory / "k3_export")).signatures["serving_default"]
    frozen = tf1.GraphDef()
    frozen.ParseFromString((directory / "frozen.pb").read_bytes())
    references = {
        "k3.keras": shared["keras_predictions"][:50],
        "attention.keras": shared["attention"].predict(images, verbose=0),
        "module_sm": module(pixels=tf.constant(images))["scores"].numpy(),
        "k3_export": list(exported(tf.constant(images)).values())[0].numpy(),
        "frozen.pb": fx.run_graph_def(frozen, "images:0", "probabilities:0", images),
    }
    return directory, images, references


def imported(path, images, quantize=False):
    """The imported graph's output on images (softmax put back where the file had it), its variables, and the
    tfquant report when quantize."""
    prepared = graph_import.prepare(load_file_graph(str(path), detect_format(str(path))))
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 8, 8, 2])
        with tf1.variable_scope("model"):
            logits = graph_import.import_graph(prepared, x)
        output = tf.nn.softmax(logits) if prepared.output_is_softmax else logits
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=4, quantize_all_layers=True),
                                        is_training=False) if quantize else None
        trainable = sorted(v.op.name for v in tf1.trainable_variables())
        frozen = sorted(v.op.name for v in tf1.global_variables() if v.op.name.startswith("model/")
                        and v.op.name not in trainable)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            values = sess.run(output, {x: images})
    return values, trainable, frozen, report


@pytest.mark.parametrize("name", ["k3.keras", "attention.keras", "module_sm", "k3_export", "frozen.pb"])
def test_imported_graph_computes_the_files_outputs(files, name):
    directory, images, references = files
    values, trainable, frozen, _ = imported(directory / name, images)
    np.testing.assert_allclose(values, references[name], rtol=1e-4, atol=1e-5)
    assert trainable  # weights became variables initialised from the file (the outputs match)
    if name in ("k3.keras", "module_sm", "frozen.pb"):
        assert len(frozen) == 2  # moving mean and variance (frozen graph: variance and the fused mean input)


def test_trainable_sets_of_each_format(files):
    directory, images, _ = files
    _, trainable, frozen, _ = imported(directory / "k3.keras", images)
    assert trainable == sorted("model/" + n for n in (
        "conv/kernel", "conv/bias", "bn/gamma", "bn/beta", "conv_2/kernel", "conv_2/bias", "fc/kernel", "fc/bias"))
    assert frozen == ["model/bn/moving_mean", "model/bn/moving_variance"]
    _, trainable, frozen, _ = imported(directory / "module_sm", images)
    assert len(trainable) == 5 and len(frozen) == 2
    _, trainable, frozen, _ = imported(directory / "frozen.pb", images)
    assert {"model/conv/kernel", "model/conv/bias", "model/dw/kernel", "model/fc/kernel", "model/fc/bias"} \
        <= set(trainable) and len(trainable) == 7


def test_attention_projections_are_quantized(files):
    directory, images, _ = files
    _, _, _, report = imported(directory / "attention.keras", images, quantize=True)
    quantized = sorted((layer.op_type, layer.weight_variable) for layer in report.weight_layers if layer.quantized)
    assert [name for kind, name in quantized if kind == "BatchMatMulV2"] == [
        "model/mha/%s/kernel" % part for part in ("attention_output", "key", "query", "value")]
    assert [kind for kind, _ in quantized].count("MatMul") == 2  # the two Dense layers
    assert all(layer.quantized for layer in report.weight_layers)


def test_unfused_batch_norm_variance_of_a_frozen_graph_stays_fixed(tmp_path):
    # tf.nn.batch_normalization (Keras 3's BatchNormalization frozen by convert_variables_to_constants_v2) reads
    # the variance through an AddV2 (+ epsilon) into an Rsqrt; as an elementwise Add's constant it used to train,
    # went negative and turned the run to NaN.
    rng = np.random.default_rng(0)
    values = {"mean": rng.normal(size=4), "variance": rng.uniform(0.5, 2, size=4), "beta": rng.normal(size=4),
              "gamma": rng.uniform(0.5, 2, size=4)}
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 8, 8, 2], name="images")
        kernel = tf.constant(rng.normal(size=(3, 3, 2, 4)).astype(np.float32), name="conv/kernel")
        consts = {k: tf.constant(v.astype(np.float32), name="bn/" + k) for k, v in values.items()}
        y = tf.nn.batch_normalization(tf.nn.conv2d(x, kernel, 1, "SAME"), consts["mean"], consts["variance"],
                                      consts["beta"], consts["gamma"], 1e-3)
        tf.identity(tf.reduce_mean(y, [1, 2]), name="scores")
    path = tmp_path / "bn.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    prepared = graph_import.prepare(load_file_graph(str(path), "frozen_graph", input_name="images",
                                                    output_name="scores"))
    trainable = {p.const_name: p.trainable for p in prepared.parameters.values()}
    assert trainable["bn/variance"] is False
    assert trainable["conv/kernel"] and trainable["bn/gamma"] and trainable["bn/beta"]


def _einsum_graph(path, equation, weight_shape, rng):
    """A frozen graph: images (N, 8, 8, 2) -> (N, 8, 16) tokens -> Einsum(equation) with a constant weight -> mean."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 8, 8, 2], name="images")
        tokens = tf.reshape(x, [-1, 8, 16])
        weight = tf.constant(rng.normal(size=weight_shape).astype(np.float32), name="proj/kernel")
        tf.identity(tf.reduce_mean(tf.einsum(equation, tokens, weight), 1), name="scores")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return str(path)


def test_einsum_matmul_on_the_last_axis_is_quantized(tmp_path):
    # tf.einsum('btc,cd->btd', x, w) in a user's tf.function is a matmul on the last axis: it used to be refused.
    rng = np.random.default_rng(1)
    path = _einsum_graph(tmp_path / "einsum.pb", "btc,cd->btd", (16, 10), rng)
    images = rng.normal(size=(5, 8, 8, 2)).astype(np.float32)
    graph_def = tf1.GraphDef()
    graph_def.ParseFromString(open(path, "rb").read())
    reference = fx.run_graph_def(graph_def, "images:0", "scores:0", images)
    prepared = graph_import.prepare(load_file_graph(path, "frozen_graph", input_name="images", output_name="scores"))
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 8, 8, 2])
        with tf1.variable_scope("model"):
            logits = graph_import.import_graph(prepared, x)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            np.testing.assert_allclose(sess.run(logits, {x: images}), reference, rtol=1e-5, atol=1e-5)
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=4, quantize_all_layers=True),
                                        is_training=False)
    (layer,) = report.weight_layers
    assert (layer.op_type, layer.weight_variable, layer.quantized) == ("BatchMatMulV2", "model/proj/kernel", True)


def test_einsum_of_another_form_with_a_weight_is_refused(tmp_path):
    path = _einsum_graph(tmp_path / "einsum.pb", "btc,dc->btd", (10, 16), np.random.default_rng(2))
    from nets.model_formats import ModelFileError
    with pytest.raises(ModelFileError, match="of type Einsum whose weight tfquant cannot quantize"):
        graph_import.prepare(load_file_graph(path, "frozen_graph", input_name="images", output_name="scores"))
