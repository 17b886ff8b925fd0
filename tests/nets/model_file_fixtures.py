"""Model files of every format nets/model_file_run.py reads, written by plain Keras 3 / TensorFlow code, and
the helpers the model-file tests share."""
import atexit
import functools
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_data(directory):
    """An easy 3-class problem on 8x8x2 images (class = brightness of channel 0), as data.npz."""
    rng = np.random.default_rng(0)

    def split(n):
        labels = rng.integers(0, 3, n)
        images = rng.normal(0, 1, (n, 8, 8, 2)).astype(np.float32)
        images[:, :, :, 0] += 1.5 * labels[:, None, None]
        return images, labels
    x_train, y_train = split(256)
    x_test, y_test = split(200)
    np.savez(os.path.join(directory, "data.npz"), x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return x_train, y_train, x_test, y_test


def make_keras3_models(directory, x_train, y_train):
    """conv + batch norm + dense (k3.keras) and a depthwise model exported as a SavedModel (k3_export/)."""
    import keras  # Keras 3: `import keras` is Keras 3 whatever TF_USE_LEGACY_KERAS says
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    # Layer names given: Keras numbers unnamed layers by how many were built before in the process.
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    conv_bn = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="fc")(x))
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(8, 1, activation="relu", name="expand")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise")(x)
    x = keras.layers.Conv2D(8, 1, activation="relu", name="project")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    depthwise = keras.Model(inputs, keras.layers.Dense(3, name="fc")(x))
    for model, loss in ((conv_bn, "sparse_categorical_crossentropy"),
                        (depthwise, keras.losses.SparseCategoricalCrossentropy(from_logits=True))):
        model.compile(keras.optimizers.Adam(0.01), loss)
        model.fit(x_train, y_train, epochs=4, batch_size=32, verbose=0)
    conv_bn.save(os.path.join(directory, "k3.keras"))
    depthwise.export(os.path.join(directory, "k3_export"), verbose=False)
    return conv_bn


class Scorer(tf.Module):
    """A tf.Module: conv (frozen batch norm as tf.nn.batch_normalization) + relu + pooling + matmul."""

    def __init__(self, source):
        super().__init__()
        kernel, bias, gamma, beta, mean, variance = [w.numpy() for w in source.layers[1].weights
                                                     + source.layers[2].weights]
        self.kernel, self.bias = tf.Variable(kernel), tf.Variable(bias)
        self.gamma, self.beta = tf.Variable(gamma), tf.Variable(beta)
        self.mean, self.variance = tf.Variable(mean, trainable=False), tf.Variable(variance, trainable=False)
        self.dense = tf.Variable(np.random.default_rng(1).normal(0, 0.5, (8, 3)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32, name="pixels")])
    def __call__(self, pixels):
        x = tf.nn.bias_add(tf.nn.conv2d(pixels, self.kernel, 1, "SAME"), self.bias)
        x = tf.nn.relu(tf.nn.batch_normalization(x, self.mean, self.variance, self.beta, self.gamma, 1e-3))
        return {"scores": tf.matmul(tf.reduce_mean(x, [1, 2]), self.dense)}


def make_module_saved_model(directory, source):
    """tf.saved_model.save of a tf.Module (module_sm/, signature serving_default: pixels -> scores)."""
    module = Scorer(source)
    tf.saved_model.save(module, os.path.join(directory, "module_sm"), signatures=module.__call__)


def make_frozen_graph(directory, source):
    """A TF1 frozen GraphDef (frozen.pb): conv + bias + fused batch norm + relu6, depthwise, matmul + bias, softmax;
    weights the Keras model's where shapes allow."""
    rng = np.random.default_rng(2)
    kernel, bias, gamma, beta, mean, variance = [w.numpy() for w in source.layers[1].weights
                                                 + source.layers[2].weights]
    dense, dense_bias = [w.numpy() for w in source.layers[-1].weights]
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None, 8, 8, 2], name="images")
        x = tf.nn.bias_add(tf.nn.conv2d(images, tf.constant(kernel, name="conv/kernel"), 1, "SAME"),
                           tf.constant(bias, name="conv/bias"))
        x, _, _ = tf1.nn.fused_batch_norm(x, tf.constant(gamma), tf.constant(beta), tf.constant(mean),
                                          tf.constant(variance), epsilon=1e-3, is_training=False)
        x = tf.nn.relu6(x)
        depthwise = tf.constant(rng.normal(0, 0.4, (3, 3, 8, 1)).astype(np.float32), name="dw/kernel")
        x = tf.nn.relu(tf.nn.depthwise_conv2d(x, depthwise, [1, 1, 1, 1], "SAME"))
        logits = tf.matmul(tf.reduce_mean(x, [1, 2]), tf.constant(dense, name="fc/kernel")) + \
            tf.constant(dense_bias, name="fc/bias")
        tf.nn.softmax(logits, name="probabilities")
    with open(os.path.join(directory, "frozen.pb"), "wb") as handle:
        handle.write(graph.as_graph_def().SerializeToString())


def make_attention_model(directory):
    """A Keras 3 file with MultiHeadAttention (EinsumDense projections) and LayerNormalization."""
    import keras
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Dense(8, name="embed")(keras.layers.Reshape((16, 8))(inputs))
    x = keras.layers.LayerNormalization(name="norm")(x + keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x))
    attention = keras.Model(inputs, keras.layers.Dense(3, name="fc")(keras.layers.GlobalAveragePooling1D()(x)))
    attention.save(os.path.join(directory, "attention.keras"))
    return attention


@functools.lru_cache(maxsize=None)
def shared_files():
    """Every model file, built once per process (building trains two small Keras models) in a temporary directory.

    Returns:
      dict: dir (pathlib.Path), x_test, y_test, keras_predictions (k3.keras on x_test), attention (the model).
    """
    directory = tempfile.mkdtemp(prefix="tfq_model_files_")
    atexit.register(shutil.rmtree, directory, True)
    x_train, y_train, x_test, y_test = make_data(directory)
    source = make_keras3_models(directory, x_train, y_train)
    make_module_saved_model(directory, source)
    make_frozen_graph(directory, source)
    attention = make_attention_model(directory)
    return {"dir": pathlib.Path(directory), "x_test": x_test, "y_test": y_test,
            "keras_predictions": source.predict(x_test, verbose=0), "attention": attention}


def run_graph_def(graph_def, input_name, output_name, images):
    """A GraphDef's output on images, in plain TensorFlow."""
    graph = tf.Graph()
    with graph.as_default():
        tf1.import_graph_def(graph_def, name="")
    with tf1.Session(graph=graph) as sess:
        return sess.run(output_name, {input_name: images})


def run_file(cwd, *flags):
    """nets/model_file_run.py in a subprocess (as a user runs it)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    env.pop("TF_USE_LEGACY_KERAS", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "nets", "model_file_run.py"), "--batch_size=32",
                           "--batch_size_eval=100", "--summ_step=4"] + list(flags), cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=600)


def quantized_checkpoint_logits(run_dir, images):
    """The quantized model's logits: the run's saved inference graph rewritten by tfquant with the report's
    config, restored from its latest checkpoint (the learners' own evaluation path, not the export's)."""
    import tfquant
    from tfquant.export import inference_graph
    from tfquant.report import config_from_report, load_report
    report = load_report(os.path.join(run_dir, "quant_report.json"))
    saved = inference_graph.InferenceGraph(os.path.join(run_dir, inference_graph.INFERENCE_GRAPH_NAME))
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None] + list(images.shape[1:]))
        logits = saved.build_forward(x)
        logits = tfquant.quantize_graph(graph, config_from_report(report), is_training=False).output(logits)
        saver = tf1.train.Saver(tf1.global_variables())
    with tf1.Session(graph=graph) as sess:
        saver.restore(sess, tf.train.latest_checkpoint(run_dir))
        return sess.run(logits, {x: images})
