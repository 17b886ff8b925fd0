"""QuantConfig.quantize_layer_outputs: the trained graph quantizes every tensor an int8 model holds (model
input, layer outputs before residual adds, residual sums, logits) on the integer grid, so the export
needs no calibration and reproduces the trained graph."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from learners import run_settings
from tests.conftest import new_session
from tests.tfquant.test_export import (IMAGE_SHAPE, NUM_CLASSES, _batch_norm, _conv, _dense, _quantized_eval,
                                       _save_quantized, _synthetic_data)
from tfquant import match
from tfquant.export import fake_quant_graph, frozen_graph, model_export, onnx_export, tflite_export

tf1 = tf.compat.v1
INPUT_SHAPE = [None] + IMAGE_SHAPE
CONFIG = tfquant.QuantConfig(weight_bits=8, activation_bits=8, quantize_all_layers=True, use_buckets=True,
                             weight_scheme="symmetric", fold_batch_norms=True, quantize_layer_outputs=True)


def residual_forward(images, is_training=False):
    """conv-bn-relu; conv-bn added to it then relu; conv(+bias) added with no activation; mean; fc."""
    x = tf.nn.relu(_batch_norm(_conv(images, "conv1", 8, False), "bn1", is_training))
    y = _batch_norm(_conv(x, "conv2", 8, False), "bn2", is_training)
    x = tf.nn.relu(x + y)
    x = x + _conv(x, "conv3", 8, True)
    return _dense(tf.reduce_mean(x, [1, 2]), "fc", NUM_CLASSES)


# What an int8 model holds besides the two ReLUs: the image conv1 reads, conv2's folded output before the
# first add, conv3's output before the second, that add (no activation follows), the mean the fc reads (an
# average of levels is no level: the runtime requantizes it) and the logits.
EXPECTED = {"Relu", "Relu_1", "conv1/Conv2D:input", "conv2/Conv2D:output", "conv3/Conv2D:output", "add_1",
            "Mean", "fc/MatMul:output"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("layer_outputs")
    checkpoint, report_path = _save_quantized(str(directory), CONFIG, np.random.default_rng(5), train_steps=40,
                                              forward_fn=residual_forward)
    report = tfquant.report.load_report(report_path)
    images, labels = _synthetic_data(np.random.default_rng(11), 300)
    reference, _ = _quantized_eval(checkpoint, CONFIG, images, forward_fn=residual_forward)
    folded = frozen_graph.folded_weight_values(residual_forward, checkpoint, INPUT_SHAPE)
    packed = str(directory / "model.tfq")
    model_export.pack_checkpoint(checkpoint, report, packed, folded_weights=folded)
    weights, _ = model_export.load_packed_weights(packed)
    return dict(checkpoint=checkpoint, report=report, images=images, labels=labels, reference=reference,
                weights=weights)


def test_report_names_every_integer_tensor_with_a_trained_range(trained):
    layers = {layer.name: layer for layer in trained["report"].activation_layers}
    assert set(layers) == EXPECTED
    for layer in layers.values():
        assert layer.quantized and layer.bits == 8 and len(layer.range_variables) == 2
    assert layers["conv1/Conv2D:input"].op_type == "Input"


def test_found_tensors_skip_outputs_only_quantized_activations_read():
    graph = tf.Graph()
    with graph.as_default():
        residual_forward(tf1.placeholder(tf.float32, INPUT_SHAPE))
        candidates = match.find_weight_candidates(graph)
        # Without folding, conv2's output is read by its batch norm: the layer output is the conv's own.
        found = match.find_integer_tensors(graph, candidates, covered={"Relu", "Relu_1"})
        assert [(item.name, item.tensor.op.name) for item in found] == [
            ("conv1/Conv2D:input", "Placeholder"), ("conv2/Conv2D:output", "bn2/FusedBatchNormV3"),
            ("conv3/Conv2D:output", "conv3/BiasAdd"), ("Mean", "Mean"), ("fc/MatMul:output", "fc/BiasAdd"),
            ("add_1", "add_1")]
        # An activation left float covers nothing: conv1's output (read by bn1) is then a layer output too.
        uncovered = match.find_integer_tensors(graph, candidates, covered=set())
        assert {item.name for item in uncovered} - {item.name for item in found} == {"conv1/Conv2D:output", "add"}


def test_residual_sum_of_identity_wrapped_outputs_is_found():
    """A rebuilt Keras 3 model's Add layer: tf.add_n of its inputs' Identity-wrapped layer outputs. The sum is a
    residual sum like x + y (its inputs are computed, seen through the Identity ops); a sum with a variable
    read (through Identity) is a bias, not a residual sum."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, INPUT_SHAPE)
        x = _conv(images, "conv1", 8, True)
        y = _conv(x, "conv2", 8, True)
        summed = tf.add_n([tf.identity(x), tf.identity(y)], name="add_layer")
        shift = tf1.get_variable("shift", [8], initializer=tf1.zeros_initializer())
        shifted = tf.add(tf.identity(summed), tf.identity(shift), name="shifted")
        _dense(tf.reduce_mean(shifted, [1, 2]), "fc", NUM_CLASSES)
        candidates = match.find_weight_candidates(graph)
        found = {item.name: item.op_type for item in match.find_integer_tensors(graph, candidates, covered=set())}
    assert found.get("add_layer") == "AddN"
    assert "shifted" not in found


def _nudged_codes(values, low, high, bits=8):
    """values / scale + zero point with TFLite's nudging of [min(low, 0), max(high, 0)], in NumPy."""
    low, high = min(low, 0.0), max(high, 0.0)
    levels = 2 ** bits - 1
    scale = (high - low) / levels
    zero_point = np.clip(np.round(-low / scale), 0, levels)
    return values / scale + zero_point


def test_eval_graph_holds_layer_outputs_on_the_integer_grid(trained):
    ranges = {layer.name: layer.range_variables for layer in trained["report"].activation_layers}
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, INPUT_SHAPE)
        residual_forward(images, is_training=False)
        tfquant.quantize_graph(graph, CONFIG, is_training=False)
        # What the second add's reader (the mean) reads now: the quantized residual sum.
        mean = [op for op in graph.get_operations() if op.type == "Mean"][0]
        quantized_sum = mean.inputs[0]
        saver = tf1.train.Saver()
        with new_session(graph) as sess:
            saver.restore(sess, trained["checkpoint"])
            value = sess.run(quantized_sum, {images: trained["images"][:50]})
    reader = tf.train.load_checkpoint(trained["checkpoint"])
    low, high = (reader.get_tensor(name) for name in ranges["add_1"])
    assert quantized_sum.op.type != "AddV2"
    codes = _nudged_codes(value, float(low), float(high))
    np.testing.assert_allclose(codes, np.round(codes), atol=2e-3)
    assert codes.min() >= -1e-3 and codes.max() <= 255 + 1e-3
    assert len(np.unique(np.round(codes))) > 20  # a real spread of levels, not a constant


def test_export_needs_no_calibration_and_reproduces_the_trained_graph(trained):
    graph = fake_quant_graph.build(residual_forward, trained["weights"], trained["report"], INPUT_SHAPE, None)
    assert graph.calibration_images == 0
    assert {r["source"] for r in graph.activations} == {"trained"}
    assert len(graph.activations) == len(EXPECTED)
    # The logits are codes of the trained logits range in every graph: the same grid, so the graphs differ
    # only where float rounding puts some tensor on the other side of a rounding boundary.
    low, high = (float(trained["weights"][n]) for n in
                 next(l for l in trained["report"].activation_layers if l.name == "fc/MatMul:output").range_variables)
    step = (max(high, 0.0) - min(low, 0.0)) / 255
    reference = trained["reference"]
    codes = _nudged_codes(reference, low, high)
    np.testing.assert_allclose(codes, np.round(codes), atol=2e-3)
    logits = frozen_graph.run_graph_def(graph.graph_def, trained["images"])
    assert np.abs(logits - reference).max() <= 2.01 * step
    assert np.mean(logits.argmax(1) == reference.argmax(1)) >= 0.99
    model = tflite_export.convert_int8_trained(graph, INPUT_SHAPE)
    int8 = tflite_export.run_tflite(model, trained["images"])
    agreement = np.mean(int8.argmax(1) == reference.argmax(1))
    assert agreement >= 0.99, agreement
    # Integer requantization moves a tensor by at most one step here and there.
    assert np.abs(int8 - reference).max() <= 4.01 * step
    if onnx_export.available():
        onnx_logits = onnx_export.run_onnx(onnx_export.convert(graph.graph_def), trained["images"])
        assert np.mean(onnx_logits.argmax(1) == trained["reference"].argmax(1)) >= 0.99


def test_export_without_trained_layer_outputs_needs_calibration_images(tmp_path):
    config = tfquant.QuantConfig(weight_bits=8, activation_bits=8, quantize_all_layers=True,
                                 weight_scheme="symmetric", fold_batch_norms=True)
    checkpoint, report_path = _save_quantized(str(tmp_path), config, np.random.default_rng(1),
                                              forward_fn=residual_forward)
    report = tfquant.report.load_report(report_path)
    folded = frozen_graph.folded_weight_values(residual_forward, checkpoint, INPUT_SHAPE)
    model_export.pack_checkpoint(checkpoint, report, str(tmp_path / "m.tfq"), folded_weights=folded)
    weights, _ = model_export.load_packed_weights(str(tmp_path / "m.tfq"))
    with pytest.raises(model_export.ExportError, match=r"6 tensors have no trained range .*expected calibration"):
        fake_quant_graph.build(residual_forward, weights, report, INPUT_SHAPE, None)


@pytest.mark.parametrize("settings, message", [
    (dict(act_range="pact"), r"quantize_layer_outputs=True is not valid with act_range='pact'"),
    (dict(activation_bits=1), r"quantize_layer_outputs=True is not valid with activation_bits=1"),
    (dict(quantize_layer_outputs=1), r"quantize_layer_outputs=1 is not valid; expected True or False"),
])
def test_config_refuses_what_int8_cannot_hold(settings, message):
    with pytest.raises(ValueError, match=message):
        tfquant.QuantConfig(**dict(dict(quantize_layer_outputs=True), **settings))


def test_records_older_than_the_flag_resume_only_without_it():
    recorded = {"uql_weight_bits": 8}
    assert run_settings.differences(recorded, {"uql_weight_bits": 8, "uql_quantize_layer_outputs": False}) == []
    assert run_settings.differences(recorded, {"uql_weight_bits": 8, "uql_quantize_layer_outputs": True}) == [
        ("uql_quantize_layer_outputs", False, True)]


def test_zero_exact_grid_is_tensorflows_fake_quant():
    """ops.quantize_zero_exact (plain ops, so float TFLite holds it) against TF's FakeQuant and NumPy."""
    rng = np.random.default_rng(3)
    for bits in (2, 4, 8):
        for _ in range(20):
            low, high = np.float32(-abs(rng.normal()) * rng.uniform(0, 3)), np.float32(abs(rng.normal()) * 5 + 0.01)
            values = (rng.normal(size=400) * 3).astype(np.float32)
            ours = tfquant.ops.quantize_zero_exact(tf.constant(values), bits, tf.constant(low), tf.constant(high))
            theirs = tf.quantization.fake_quant_with_min_max_vars(values, low, high, num_bits=bits)
            step = (high - low) / (2 ** bits - 1)
            # Float rounding: our step is the product by float32(1/levels) (what a session computes), FakeQuant's
            # kernel divides; a level is a float32 sum of terms as large as the range, so an ulp of those.
            ulps = 4 * np.finfo(np.float32).eps * max(abs(low), abs(high))
            np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6, atol=max(1e-5 * step, ulps))
            codes = _nudged_codes(ours.numpy().astype(np.float64), float(low), float(high), bits)
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
            # Nearest level, clipped to the nudged range: no value is further than half a step from its level
            # unless it lies outside the range.
            zero_point = np.clip(np.floor(-low / step + 0.5), 0, 2 ** bits - 1)
            nudged = (-zero_point * step, (2 ** bits - 1 - zero_point) * step)
            inside = (values >= nudged[0]) & (values <= nudged[1])
            assert np.abs(ours.numpy() - values)[inside].max() <= 0.5 * step * (1 + 1e-4)
            # (the step is the product by float32(1/levels) a session computes: an ulp from the quotient)
            np.testing.assert_allclose(ours.numpy()[~inside], np.clip(values[~inside], *nudged), rtol=1e-6,
                                       atol=max(1e-5 * step, ulps))


def test_float_tflite_holds_the_trained_layer_outputs(trained):
    """The frozen graph (and its float TFLite model) reproduces the trained graph's quantized logits."""
    frozen = frozen_graph.freeze_inference_graph(residual_forward, trained["weights"], trained["report"],
                                                 INPUT_SHAPE)
    model = tflite_export.convert_float(frozen, INPUT_SHAPE)
    logits = tflite_export.run_tflite(model, trained["images"])
    low, high = (float(trained["weights"][n]) for n in
                 next(l for l in trained["report"].activation_layers if l.name == "fc/MatMul:output").range_variables)
    step = (max(high, 0.0) - min(low, 0.0)) / 255
    assert np.abs(logits - trained["reference"]).max() <= 2.01 * step
    codes = _nudged_codes(logits, low, high)
    np.testing.assert_allclose(codes, np.round(codes), atol=5e-3)


def _nudged_step(low, high, bits=8):
    return (max(float(high), 0.0) - min(float(low), 0.0)) / (2 ** bits - 1)


def test_eval_graph_adds_biases_on_the_int32_grid_of_an_int8_kernel(trained):
    """A layer reading a tensor on the integer grid adds round(b / (s_in * s_w)) * s_in * s_w, as int8 kernels do."""
    ranges = {layer.name: layer.range_variables for layer in trained["report"].activation_layers}
    reader = tf.train.load_checkpoint(trained["checkpoint"])
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, INPUT_SHAPE)
        residual_forward(images, is_training=False)
        tfquant.quantize_graph(graph, CONFIG, is_training=False)
        added = {name: graph.get_operation_by_name(name).inputs[1] for name in ("conv3/BiasAdd", "fc/BiasAdd")}
        saver = tf1.train.Saver()
        with new_session(graph) as sess:
            saver.restore(sess, trained["checkpoint"])
            # (The ranges' tf.where also reads the batch's own range, unused once a range was recorded.)
            values = sess.run(added, {images: trained["images"][:10]})
    # conv3 reads the quantized Relu_1, the fc the quantized mean.
    for bias_add, variable, source in (("conv3/BiasAdd", "conv3", "Relu_1"), ("fc/BiasAdd", "fc", "Mean")):
        bias = reader.get_tensor(variable + "/biases")
        weight = reader.get_tensor(variable + "/weights")
        weight_step = np.abs(weight.reshape(-1, weight.shape[-1])).max(axis=0) / 127
        step = _nudged_step(*(reader.get_tensor(name) for name in ranges[source])) * weight_step
        codes = values[bias_add] / step
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        np.testing.assert_array_equal(np.round(codes), np.round(bias / step))
        assert np.abs(bias).max() > 0 and not np.array_equal(values[bias_add], bias)


def test_int8_model_reproduces_the_eval_graph_codes(trained):
    """With biases on the int32 grid and the mean requantized as the runtime does, the int8 logits are the
    eval graph's codes but for float rounding at a boundary here and there."""
    graph = fake_quant_graph.build(residual_forward, trained["weights"], trained["report"], INPUT_SHAPE, None)
    low, high = (float(trained["weights"][n]) for n in
                 next(l for l in trained["report"].activation_layers if l.name == "fc/MatMul:output").range_variables)
    int8 = tflite_export.run_tflite(tflite_export.convert_int8_trained(graph, INPUT_SHAPE), trained["images"])
    ours, theirs = (np.round(_nudged_codes(v, low, high)) for v in (trained["reference"], int8))
    assert np.mean(ours == theirs) >= 0.99, np.mean(ours == theirs)
    assert np.abs(ours - theirs).max() <= 1


def test_frozen_graph_adds_the_same_int32_biases(trained):
    """The frozen graph (weights decoded from the packed file) quantizes its biases as the eval graph does: its
    logits are the eval graph's, not merely close."""
    frozen = frozen_graph.freeze_inference_graph(residual_forward, trained["weights"], trained["report"],
                                                 INPUT_SHAPE)
    names = {node.name for node in frozen.node}
    assert {"conv3/Conv2D/bias_quant/Round", "fc/MatMul/bias_quant/Round"} <= names
    logits = frozen_graph.run_graph_def(frozen, trained["images"])
    np.testing.assert_array_equal(logits.argmax(1), trained["reference"].argmax(1))
    np.testing.assert_allclose(logits, trained["reference"], atol=1e-5)


def test_logits_a_skipped_softmax_read_are_the_quantized_output():
    """A model file's softmax head reads the logits before quantize_graph runs (the run script trains on the
    softmax's input): report.output gives their quantized version, which training must read for the range to be
    recorded and which the int8 files hold."""
    config = tfquant.QuantConfig(weight_bits=8, activation_bits=8, quantize_all_layers=True,
                                 weight_scheme="symmetric", quantize_layer_outputs=True)
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None, 6])
        logits = _dense(tf.nn.relu(_dense(images, "fc1", 8)), "fc2", NUM_CLASSES)
        tf.nn.softmax(logits)  # the head the caller skips
        report = tfquant.quantize_graph(graph, config, is_training=True)
        output = report.output(logits)
        ranges = {v.op.name: v for v in tf1.global_variables()}
        with new_session(graph) as sess:
            sess.run(tf1.global_variables_initializer())
            values = sess.run(output, {images: np.random.default_rng(0).normal(size=(32, 6))})
            steps = sess.run(ranges["fc2/MatMul/output/act_quant/ema_steps"])
    assert output.name != logits.name
    assert steps == 1  # the logits' range was recorded by the step that read them
    levels = np.unique(values)
    gaps = np.diff(levels)
    np.testing.assert_allclose(gaps / gaps.min(), np.round(gaps / gaps.min()), atol=1e-3)  # on one grid
