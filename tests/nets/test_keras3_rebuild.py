"""A Keras 3 file rebuilt from tf.compat.v1 ops (nets.model_formats.keras3_graph): evaluation is Keras's own
inference call, a training step normalises with batch statistics and moves the moving averages as Keras does,
the weights stay variables tfquant quantizes, a layer that does not map falls back to the frozen graph (said
once), and the uniform (with --uql_fold_batch_norms) and ptq runs train, save and export it."""
import json
import re

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from nets import model_file
from tests.nets import model_file_fixtures as fx

tf1 = tf.compat.v1
MOMENTUM = 0.8


def conv_bn_dense(keras):
    """The brief's conv + batch norm + dense classifier (no conv bias, so the batch norm folds)."""
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=MOMENTUM, name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="fc")(x))


def many_layers(keras):
    """Every kind of layer the rebuild maps, for the inference comparison."""
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Rescaling(0.5, offset=0.1, name="rescale")(inputs)
    x = keras.layers.ZeroPadding2D(((1, 0), (0, 1)), name="pad")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="valid", activation="swish", name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=1, name="dw")(x)
    y = keras.layers.Activation("gelu", name="gelu")(y)
    x = keras.layers.Add(name="add")([x, y])
    z = keras.layers.Conv2D(4, 1, dilation_rate=1, activation="relu6", name="pw")(x)
    x = keras.layers.Concatenate(name="cat")([x, keras.layers.LeakyReLU(0.1, name="leaky")(z)])
    x = keras.layers.MaxPooling2D(2, padding="same", name="max")(x)
    a = keras.layers.AveragePooling2D(2, name="avg")(x)
    b = keras.layers.GlobalMaxPooling2D(keepdims=True, name="gmax")(x)
    x = keras.layers.Multiply(name="mul")([a, b]) - a  # `-`: a Keras operation of the functional model
    x = keras.layers.Dropout(0.3, name="drop")(keras.layers.Flatten(name="flat")(x))
    x = keras.layers.Dense(6, activation="tanh", name="d1")(x)
    x = keras.layers.BatchNormalization(center=False, name="bn_dense")(x)
    x = keras.layers.Reshape((2, 3), name="reshape")(x)
    x = keras.layers.Flatten(name="flat2")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(x))


def sequential_frozen_bn(keras):
    """A Sequential model whose batch norm is frozen (trainable=False): Keras keeps its moving statistics."""
    return keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(4, 3, name="conv"),
                             keras.layers.BatchNormalization(trainable=False, name="bn"),
                             keras.layers.Flatten(name="flat"), keras.layers.Dense(3, name="fc")])


def randomise_moving_statistics(model, rng):
    """Moving statistics unlike a fresh layer's, so inference depends on them."""
    for layer in model.layers:
        if layer.__class__.__name__ == "BatchNormalization":
            size = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, size).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size).astype(np.float32))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import keras
    directory = tmp_path_factory.mktemp("keras3_rebuild")
    _, _, x_test, _ = fx.make_data(str(directory))
    rng = np.random.default_rng(3)
    keras.utils.set_random_seed(3)
    built = {}
    for name, make in (("conv_bn", conv_bn_dense), ("many", many_layers), ("sequential", sequential_frozen_bn)):
        model = make(keras)
        randomise_moving_statistics(model, rng)
        model.save(directory / (name + ".keras"))
        built[name] = keras.saving.load_model(str(directory / (name + ".keras")))
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.BatchNormalization(momentum=MOMENTUM, name="bn")(keras.layers.Conv2D(4, 3, name="conv")(inputs))
    x = keras.layers.LayerNormalization(name="norm")(keras.layers.Flatten()(x))  # does not map
    keras.Model(inputs, keras.layers.Dense(3, name="fc")(x)).save(directory / "unmapped.keras")
    built["unmapped"] = keras.saving.load_model(str(directory / "unmapped.keras"))
    shared = keras.layers.Conv2D(2, 3, padding="same", name="shared")  # called twice: no rebuild
    x = keras.layers.BatchNormalization(momentum=MOMENTUM, name="bn")(shared(shared(inputs)))
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3, name="fc")(x)).save(directory / "shared.keras")
    return {"dir": directory, "data": str(directory / "data.npz"), "x": x_test[:32], "keras": built}


def helper(models, name):
    return model_file.ModelFileHelper(str(models["dir"] / (name + ".keras")), "keras3", data_npz=models["data"],
                                      batch_size=32, batch_size_eval=100)


def run_forward(file_helper, images, is_training, fetch_names=()):
    """The helper's network on images; with is_training one step of its UPDATE_OPS, then the named variables."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 8, 8, 2])
        logits = file_helper.forward_train(x) if is_training else file_helper.forward_eval(x)
        updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
        by_name = {v.op.name: v for v in tf1.global_variables()}
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            before = sess.run([by_name[n] for n in fetch_names])
            values = sess.run(logits, {x: images})
            if is_training:
                sess.run(updates, {x: images})
            after = sess.run([by_name[n] for n in fetch_names])
    return values, updates, before, after, graph


@pytest.mark.parametrize("name", ["conv_bn", "many", "sequential"])
def test_evaluation_is_keras_inference_at_step_0(models, name):
    file_helper = helper(models, name)
    assert file_helper.batch_norms_train and not file_helper.rebuild_plan.frozen_layers  # every layer mapped
    logits, updates, _, _, _ = run_forward(file_helper, models["x"], is_training=False)
    model = models["keras"][name]
    if name == "conv_bn":  # the softmax head is left out for the loss and the quantizer
        logits = tf.nn.softmax(logits).numpy()
    np.testing.assert_allclose(logits, model(models["x"], training=False).numpy(), rtol=1e-5, atol=1e-5)
    assert not updates


def test_training_step_uses_batch_statistics_and_moves_the_averages_as_keras(models):
    import keras
    file_helper = helper(models, "conv_bn")
    names = ["model/bn/moving_mean", "model/bn/moving_variance"]
    logits, updates, before, after, graph = run_forward(file_helper, models["x"], True, names)
    assert len(updates) == 2
    model = models["keras"]["conv_bn"]
    np.testing.assert_allclose(before, [model.get_layer("bn").moving_mean.numpy(),
                                        model.get_layer("bn").moving_variance.numpy()], rtol=1e-6)
    # NumPy: the batch's statistics of the batch norm's input (the conv output, by Keras), the momentum update.
    conv = keras.Model(model.inputs, model.get_layer("conv").output)(models["x"]).numpy()
    mean, variance = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    np.testing.assert_allclose(after[0], MOMENTUM * before[0] + (1 - MOMENTUM) * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after[1], MOMENTUM * before[1] + (1 - MOMENTUM) * variance, rtol=1e-5, atol=1e-6)
    assert np.abs(after[1] - before[1]).max() > 1e-3  # they moved
    # The forward pass normalises with the batch statistics, as Keras's training call does.
    trained = keras.saving.load_model(str(models["dir"] / "conv_bn.keras"))
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), trained(models["x"], training=True).numpy(),
                               rtol=1e-5, atol=1e-5)
    batch_norms = [op for op in graph.get_operations() if op.type.startswith("FusedBatchNorm")]
    assert [op.get_attr("is_training") for op in batch_norms] == [True]


def test_frozen_batch_norm_of_a_sequential_model_keeps_its_moving_statistics_in_training(models):
    file_helper = helper(models, "sequential")
    # A Sequential model's weight paths start with its name, which Keras numbers.
    names = ["model/" + name for path, name in file_helper.rebuild_plan.variable_names.items()
             if path.endswith("bn/moving_mean")]
    logits, updates, before, after, _ = run_forward(file_helper, models["x"], True, names)
    assert not updates and np.array_equal(before, after)
    expected = models["keras"]["sequential"](models["x"], training=True).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_weights_stay_variables_tfquant_quantizes(models):
    file_helper = helper(models, "many")
    graph = tf.Graph()
    with graph.as_default():
        file_helper.forward_train(tf1.placeholder(tf.float32, [None, 8, 8, 2]))
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=4, quantize_all_layers=True),
                                        is_training=True)
        trainable = {v.op.name for v in tf1.trainable_variables()}
        frozen = {v.op.name for v in tf1.global_variables()} - trainable
    quantized = sorted(layer.weight_variable for layer in report.weight_layers if layer.quantized)
    assert quantized == ["model/%s/kernel" % name for name in ("conv", "d1", "dw", "fc", "pw")]
    assert {"model/bn/gamma", "model/bn/beta", "model/bn_dense/gamma", "model/conv/bias"} <= trainable
    assert {"model/bn/moving_mean", "model/bn/moving_variance", "model/bn_dense/moving_variance"} <= frozen


@pytest.mark.parametrize("is_training", [True, False])
def test_batch_norm_folds(models, is_training):
    file_helper = helper(models, "conv_bn")
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 8, 8, 2])
        logits = file_helper.forward_train(x) if is_training else file_helper.forward_eval(x)
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=8, fold_batch_norms=True),
                                        is_training=is_training)
    assert not report.notes, report.notes
    (conv,) = [op for op in graph.get_operations() if op.type == "Conv2D"]
    upstream, frontier = set(), [conv.inputs[1].op]
    while frontier and len(upstream) < 64:
        op = frontier.pop()
        if op.name not in upstream:
            upstream.add(op.name)
            frontier.extend(tensor.op for tensor in op.inputs)
    # The conv now reads its weight times gamma / sigma (the moving variance's, read before its update).
    assert any(name.startswith(conv.name + "/bn_fold/") for name in upstream), sorted(upstream)
    assert any("moving_variance" in name for name in upstream)
    (batch_norm,) = [op for op in graph.get_operations() if op.type.startswith("FusedBatchNorm")
                     and not op.name.startswith(conv.name)]
    if not is_training:  # the folded layer's readers no longer read the batch norm
        assert not batch_norm.outputs[0].consumers() and logits.graph is graph


def notes_of(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]


def test_unmapped_layer_runs_frozen_alone_and_the_rest_trains(models, capsys):
    file_helper = helper(models, "unmapped")
    (note,) = notes_of(capsys)
    assert "unmapped.keras" in note and "norm (LayerNormalization" in note and "frozen" in note, note
    assert file_helper.batch_norms_train
    model = models["keras"]["unmapped"]
    names = ["model/bn/moving_mean", "model/norm/gamma"]
    logits, _, _, _, _ = run_forward(file_helper, models["x"], False)
    np.testing.assert_allclose(logits, model(models["x"], training=False).numpy(), rtol=1e-5, atol=1e-5)
    logits, updates, before, after, graph = run_forward(file_helper, models["x"], True, names)
    # LayerNormalization is the same in both modes, so the whole model is Keras's training call (on a copy: the
    # call moves the model's own averages).
    import keras
    copy = keras.saving.load_model(str(models["dir"] / "unmapped.keras"))
    np.testing.assert_allclose(logits, copy(models["x"], training=True).numpy(), rtol=1e-5, atol=1e-5)
    assert len(updates) == 2 and np.abs(after[0] - before[0]).max() > 1e-4
    assert "model/norm/gamma" in {v.op.name for v in graph.get_collection(tf1.GraphKeys.TRAINABLE_VARIABLES)}


def test_shared_layer_falls_back_to_the_frozen_graph_with_one_note(models, capsys):
    file_helper = helper(models, "shared")
    (note,) = notes_of(capsys)
    assert "shared.keras" in note and "runs as its frozen inference graph" in note and "shared (Conv2D" in note
    assert not file_helper.batch_norms_train
    _, updates, before, after, graph = run_forward(file_helper, models["x"], True, ["model/bn/moving_mean"])
    assert not updates and np.array_equal(before, after)  # frozen: the moving statistics never move
    assert all(not op.get_attr("is_training") for op in graph.get_operations() if op.type.startswith("FusedBatch"))


def test_uniform_w4a8_with_folding_and_ptq_train_save_and_export(models, tmp_path):
    import keras
    data, model = "--data_npz=%s" % models["data"], "--model=%s" % (models["dir"] / "conv_bn.keras")
    common = [model, data, "--uql_weight_bits=4", "--uql_activation_bits=8", "--uql_quantize_all_layers"]
    folded, calibrated = tmp_path / "fold", tmp_path / "ptq"
    folded.mkdir()
    calibrated.mkdir()
    result = fx.run_file(folded, *common, "--learner=uniform", "--uql_fold_batch_norms", "--uql_quant_epochs=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(folded / "models_uql" / "quant_report.json"))
    assert report["config"]["fold_batch_norms"] and not [n for n in report["notes"] if "bn" in n], report["notes"]
    reader = tf.train.load_checkpoint(str(folded / "models_uql"))
    source = models["keras"]["conv_bn"].get_layer("bn")
    assert np.abs(reader.get_tensor("model/bn/moving_variance") - source.moving_variance.numpy()).max() > 1e-3

    # ptq on the model with a frozen LayerNormalization: its weights go back into the file too.
    common = ["--model=%s" % (models["dir"] / "unmapped.keras")] + common[1:]
    result = fx.run_file(calibrated, *common, "--learner=ptq", "--uql_calib_batches=2", "--save_model=tuned.keras")
    assert result.returncode == 0, result.stderr[-3000:]
    quantized = re.search(r"quantized accuracy:\s+([\d.]+)", result.stdout + result.stderr)
    assert quantized, result.stdout[-3000:]
    tuned = keras.saving.load_model(str(calibrated / "tuned.keras"))
    kernel = tuned.get_layer("conv").kernel.numpy()  # the script's default: one range per output channel
    assert max(len(np.unique(kernel[..., c])) for c in range(kernel.shape[-1])) <= 16  # on the 4-bit grid
    # ptq does not train: the moving statistics and the frozen layer's weights written back are the file's.
    source = models["keras"]["unmapped"]
    np.testing.assert_array_equal(tuned.get_layer("bn").moving_mean.numpy(),
                                  source.get_layer("bn").moving_mean.numpy())
    # The quantized graph rounds the LayerNormalization's offset, so the file holds the layer as Keras operations:
    # gamma is the kernel of norm_scale, beta the bias of norm_offset.
    np.testing.assert_allclose(tuned.get_layer("norm_scale").kernel.numpy().ravel(),
                               source.get_layer("norm").gamma.numpy())
    np.testing.assert_allclose(tuned.get_layer("norm_offset").bias.numpy(), source.get_layer("norm").beta.numpy())
    reference = fx.quantized_checkpoint_logits(str(calibrated / "models_uql"), models["x"])
    agreement = np.mean(tuned.predict(models["x"], verbose=0).argmax(1) == reference.argmax(1))
    assert agreement >= 0.9, agreement
    exported = fx.run_file(calibrated, *common, "--learner=ptq", "--exec_mode=export", "--export_dir=export",
                           "--export_onnx")
    assert exported.returncode == 0, exported.stderr[-3000:]
    onnx = re.search(r"accuracy onnx\S*\s+([\d.]+)", exported.stdout)
    assert onnx and float(onnx.group(1)) >= float(quantized.group(1)) - 0.03, exported.stdout[-3000:]
