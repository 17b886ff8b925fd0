"""The stand-in model files of benchmarks.model_files, written by plain Keras 3 / TensorFlow code and trained
in float on the Fashion-MNIST .npz (28x28x1 floats in [0, 1]).

Run as a script (a subprocess of the benchmark, so Keras 3 never shares a process with the run scripts'
tf_keras): `python -m benchmarks.model_file_stand_ins DATA.npz OUT_DIR EPOCHS MODEL [MODEL ...]`; writes each
model's file into OUT_DIR (names in FILES) and OUT_DIR/<model>.float.json with the file's own test accuracy.
`python -m benchmarks.model_file_stand_ins --reload MODEL SAVED DATA.npz QUANTIZED.pb` reloads a run's
--save_model output in plain Keras 3 / TensorFlow and prints as JSON its top-1 agreement with the quantized
model (the export's frozen inference graph, input 'input', output 'logits') and its accuracy on the test images.
"""
import json
import os
import sys

import numpy as np

# How each model is stored and the run-script flags it needs beyond --model.
FILES = {"conv_bn": ("conv_bn.keras", []),
         "depthwise": ("depthwise_export", []),
         "attention": ("attention.keras", []),
         "module": ("module_sm", []),
         "frozen": ("frozen.pb", ["--input_name=images", "--output_name=probabilities"]),
         "frozen_v2": ("frozen_v2.pb", [])}
# Where --save_model writes each model, in the file's own format.
SAVED = {"conv_bn": "tuned.keras", "depthwise": "tuned_export", "attention": "tuned.keras", "module": "tuned_sm",
         "frozen": "tuned.pb", "frozen_v2": "tuned.pb"}
# The input and output tensors of each frozen graph (a frozen_v2 run finds them itself: one placeholder, one
# unread op); --save_model keeps them.
FROZEN_TENSORS = {"frozen": ("images:0", "probabilities:0"), "frozen_v2": ("images:0", "Identity:0")}
SHAPE = (28, 28, 1)
CLASSES = 10


def _conv_bn(keras):
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", name="conv")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(x))
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu", name="conv_2")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax", name="fc")(x))


def _depthwise(keras):
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="stem")(inputs)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", activation="relu", name="depthwise")(x)
    x = keras.layers.Conv2D(32, 1, activation="relu", name="project")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x))


def _attention(keras):
    inputs = keras.Input(SHAPE)
    # 4x4 patches as 49 tokens of 16 values, then one attention block.
    x = keras.layers.Conv2D(16, 4, strides=4, name="patches")(inputs)
    x = keras.layers.Dense(16, name="embed")(keras.layers.Reshape((49, 16))(x))
    x = keras.layers.LayerNormalization(name="norm")(x + keras.layers.MultiHeadAttention(2, 8, name="mha")(x, x))
    # A transformer's MLP: Keras 3's exact gelu is TensorFlow's Erfc, which the ONNX export must convert.
    x = x + keras.layers.Dense(16, name="mlp_out")(keras.layers.Dense(32, activation="gelu", name="mlp_in")(x))
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x))


def _module_source(keras):
    """conv + batch norm + relu, max pooling, dense: what the tf.Module replays (its scores are the logits)."""
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", name="conv")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(epsilon=1e-3, name="bn")(x))
    x = keras.layers.Flatten()(keras.layers.MaxPooling2D(2)(x))
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax", name="fc")(x))


def _frozen_source(keras):
    """conv + batch norm + relu, depthwise (no bias) + relu, dense: what the frozen graph replays."""
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="conv")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(epsilon=1e-3, name="bn")(x))
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False, activation="relu",
                                     name="dw")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax", name="fc")(x))


def _write_frozen_v2(tf, model, path):
    """The Keras 3 model frozen the TF2 way (convert_variables_to_constants_v2 of its inference function): batch
    norm as unfused ops, the output an Identity."""
    from tensorflow.python.framework.convert_to_constants import (  # pylint: disable=import-outside-toplevel
        convert_variables_to_constants_v2)
    function = tf.function(lambda images: model(images, training=False)).get_concrete_function(
        tf.TensorSpec([None] + list(SHAPE), tf.float32, name="images"))
    graph_def = convert_variables_to_constants_v2(function).graph.as_graph_def()
    with open(path, "wb") as handle:
        handle.write(graph_def.SerializeToString())
    return lambda images: _frozen_scores(tf, graph_def, "images:0", "Identity:0", images)


def _write_module(tf, source, path):
    """A tf.Module (conv + frozen batch norm + relu, max pooling, matmul + bias) with _module_source's trained
    weights."""
    kernel, bias, gamma, beta, mean, variance = [w.numpy() for w in source.get_layer("conv").weights
                                                 + source.get_layer("bn").weights]
    dense, dense_bias = [w.numpy() for w in source.get_layer("fc").weights]

    class Classifier(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel, self.bias = tf.Variable(kernel), tf.Variable(bias)
            self.gamma, self.beta = tf.Variable(gamma), tf.Variable(beta)
            self.mean, self.variance = tf.Variable(mean, trainable=False), tf.Variable(variance, trainable=False)
            self.dense, self.dense_bias = tf.Variable(dense), tf.Variable(dense_bias)

        @tf.function(input_signature=[tf.TensorSpec([None] + list(SHAPE), tf.float32, name="pixels")])
        def __call__(self, pixels):
            x = tf.nn.bias_add(tf.nn.conv2d(pixels, self.kernel, 2, "SAME"), self.bias)
            x = tf.nn.relu(tf.nn.batch_normalization(x, self.mean, self.variance, self.beta, self.gamma, 1e-3))
            x = tf.nn.max_pool2d(x, 2, 2, "VALID")
            return {"scores": tf.matmul(tf.reshape(x, [-1, self.dense.shape[0]]), self.dense) + self.dense_bias}

    module = Classifier()
    tf.saved_model.save(module, path, signatures=module.__call__)
    return lambda images: module(tf.constant(images))["scores"].numpy()


def _write_frozen(tf, source, path):
    """A TF1 frozen GraphDef replaying _frozen_source with its trained weights as constants."""
    tf1 = tf.compat.v1
    weights = {layer: [w.numpy() for w in source.get_layer(layer).weights] for layer in ("conv", "bn", "dw", "fc")}
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None] + list(SHAPE), name="images")
        kernel, bias = weights["conv"]
        x = tf.nn.bias_add(tf.nn.conv2d(images, tf.constant(kernel, name="conv/kernel"), 2, "SAME"),
                           tf.constant(bias, name="conv/bias"))
        gamma, beta, mean, variance = weights["bn"]
        x, _, _ = tf1.nn.fused_batch_norm(x, gamma, beta, mean, variance, epsilon=1e-3, is_training=False)
        x = tf.nn.relu(tf.nn.depthwise_conv2d(tf.nn.relu(x), tf.constant(weights["dw"][0], name="dw/kernel"),
                                              [1, 2, 2, 1], "SAME"))
        dense, dense_bias = weights["fc"]
        logits = tf.matmul(tf.reshape(x, [-1, dense.shape[0]]), tf.constant(dense, name="fc/kernel")) + tf.constant(
            dense_bias, name="fc/bias")
        tf.nn.softmax(logits, name="probabilities")
    with open(path, "wb") as handle:
        handle.write(graph.as_graph_def().SerializeToString())
    graph_def = graph.as_graph_def()

    def predict(batch):
        run_graph = tf.Graph()
        with run_graph.as_default():
            tf1.import_graph_def(graph_def, name="")
        with tf1.Session(graph=run_graph) as sess:
            return sess.run("probabilities:0", {"images:0": batch})
    return predict


def build(data_path, out_dir, epochs, names):
    """Train and write the models `names`; returns {name: the file's own test accuracy}."""
    import keras  # Keras 3 (`import keras` is Keras 3 whatever TF_USE_LEGACY_KERAS says)
    import tensorflow as tf

    data = np.load(data_path)
    accuracies = {}
    for name in names:
        keras.utils.set_random_seed(0)
        builder = {"conv_bn": _conv_bn, "depthwise": _depthwise, "attention": _attention,
                   "module": _module_source, "frozen": _frozen_source, "frozen_v2": _conv_bn}[name]
        model = builder(keras)
        probabilities = name in ("conv_bn", "module", "frozen", "frozen_v2")
        model.compile(keras.optimizers.Adam(0.003),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities))
        model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=64, verbose=0)
        path = os.path.join(out_dir, FILES[name][0])
        if name in ("conv_bn", "attention"):
            model.save(path)
            predict = lambda images, model=model: model.predict(images, batch_size=500, verbose=0)
        elif name == "depthwise":
            model.export(path, verbose=False)
            # The loaded object is kept: its function reads variables the object owns.
            loaded = tf.saved_model.load(path)
            predict = lambda images, loaded=loaded: loaded.serve(tf.constant(images)).numpy()
        elif name == "module":
            predict = _write_module(tf, model, path)
        elif name == "frozen_v2":
            predict = _write_frozen_v2(tf, model, path)
        else:
            predict = _write_frozen(tf, model, path)
        scores = predict(data["x_test"].astype(np.float32))
        accuracies[name] = float(np.mean(np.argmax(scores, 1) == data["y_test"]))
        with open(os.path.join(out_dir, name + ".float.json"), "w") as handle:
            json.dump({"file_accuracy": accuracies[name], "epochs": epochs}, handle)
    return accuracies


def _frozen_scores(tf, graph_def, input_name, output_name, images):
    """Run a frozen GraphDef on images (a TF1 session, as a frozen graph's user would)."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        return sess.run(output_name, {input_name: images})


def _read_graph_def(tf, path):
    graph_def = tf.compat.v1.GraphDef()
    with open(path, "rb") as handle:
        graph_def.ParseFromString(handle.read())
    return graph_def


def reloaded_scores(model, saved_path, images):
    """The scores of a run's --save_model output reloaded in plain Keras 3 / TensorFlow."""
    import tensorflow as tf
    if saved_path.endswith(".keras"):
        import keras  # Keras 3
        return keras.saving.load_model(saved_path).predict(images, batch_size=500, verbose=0)
    if saved_path.endswith(".pb"):
        input_name, output_name = FROZEN_TENSORS[model]
        return _frozen_scores(tf, _read_graph_def(tf, saved_path), input_name, output_name, images)
    serve = tf.saved_model.load(saved_path).signatures["serving_default"]
    (input_key,) = serve.structured_input_signature[1]
    (scores,) = serve(**{input_key: tf.constant(images)}).values()
    return scores.numpy()


def reload_check(model, saved_path, data_path, quantized_pb):
    """{'agreement': same top-1 as the quantized model's frozen graph, 'accuracy': the reloaded file's}."""
    import tensorflow as tf
    data = np.load(data_path)
    images = data["x_test"].astype(np.float32)
    reference = _frozen_scores(tf, _read_graph_def(tf, quantized_pb), "input:0", "logits:0", images).argmax(1)
    classes = np.asarray(reloaded_scores(model, saved_path, images)).argmax(1)
    return {"agreement": float(np.mean(classes == reference)), "accuracy": float(np.mean(classes == data["y_test"])),
            "images": int(len(images))}


if __name__ == "__main__":
    if sys.argv[1] == "--reload":
        print(json.dumps(reload_check(*sys.argv[2:6])))
    else:
        build(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
