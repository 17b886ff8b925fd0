"""The ResNet graphs the speed and memory benchmarks time: float, rewritten by tfquant, or rewritten with
TensorFlow's fused fake-quant ops (the peer). The network and its loss come from the nets' ModelHelper, on
one random batch held in the graph, so no input pipeline is timed."""
import numpy as np
import tensorflow as tf

import tfquant
from nets.data.pipeline import ArrayData
from nets.model_helper import ResNetModelHelper
from tfquant import rewrite

tf1 = tf.compat.v1
INTRA_OP_THREADS = 2
IMAGE_SHAPE = (32, 32, 3)


class RandomBatchHelper(ResNetModelHelper):
    """The ResNet ModelHelper (network, loss) over one random batch instead of a data set."""

    base_epochs = 1

    def __init__(self, resnet_size, batch_size, seed=0):
        self._batch = random_batch(batch_size, seed)
        super().__init__(None, resnet_size, batch_size, batch_size, lrn_rate_init=0.01, momentum=0.9,
                         loss_w_dcy=2e-4, nb_epochs_rat=1.0, train_subset=None, eval_subset=None, seed=seed)

    def _load_data(self):
        images, labels = self._batch
        return ArrayData(images, labels, images, labels)

    @property
    def dataset_name(self):
        """'random'."""
        return "random"


def random_batch(batch_size, seed=0):
    """(images float32 [batch, 32, 32, 3], labels int32 [batch]) drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size,) + IMAGE_SHAPE, dtype=np.float32)
    labels = rng.integers(0, RandomBatchHelper.nb_classes, size=batch_size).astype(np.int32)
    return images, labels


def session_config():
    return tf1.ConfigProto(intra_op_parallelism_threads=INTRA_OP_THREADS, inter_op_parallelism_threads=1)


def tfquant_config(weight_bits, activation_bits, buckets, bucket_size=256):
    """QuantConfig for a benchmark mode; buckets is 'none', 'channel' or 'split'."""
    if buckets == "none":
        return tfquant.QuantConfig(weight_bits=weight_bits, activation_bits=activation_bits)
    return tfquant.QuantConfig(weight_bits=weight_bits, activation_bits=activation_bits, use_buckets=True,
                               bucket_type=buckets, bucket_size=bucket_size)


def _weight_layers_in_order(graph):
    """(op, input index) of every Conv2D / MatMul reading a trainable variable, in creation order.

    Creation order is data-flow order for nets/resnet.py (first conv first, fc last).
    """
    trainable = {v.op.name for v in graph.get_collection(tf1.GraphKeys.TRAINABLE_VARIABLES)}
    found = []
    for op in graph.get_operations():
        if op.type not in ("Conv2D", "MatMul"):
            continue
        source = op.inputs[1].op
        while source.type in ("Identity", "ReadVariableOp") and source.inputs:
            source = source.inputs[0].op
        if source.name in trainable:
            found.append((op, 1))
    return found


def add_fused_fake_quant(graph, weight_bits, activation_bits):
    """TensorFlow's fused fake-quant ops on the layers tfquant quantizes by default.

    Weights of every Conv2D / MatMul except the first and last: fake_quant_with_min_max_vars_per_channel
    with the weight's per-output-channel min/max; every Relu output: fake_quant_with_min_max_vars with the
    batch's min/max (no moving-average variables: the cheapest this peer can be).
    Returns:
      (weight insertions, activation insertions).
    """
    layers = _weight_layers_in_order(graph)[1:-1]
    relus = [op for op in graph.get_operations() if op.type == "Relu"]
    with graph.as_default():
        for op, index in layers:
            weight = op.inputs[index]
            axes = list(range(weight.shape.rank - 1))
            with tf.name_scope(op.name + "/peer_weight_quant"):
                quantized = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                    weight, tf.stop_gradient(tf.reduce_min(weight, axis=axes)),
                    tf.stop_gradient(tf.reduce_max(weight, axis=axes)), num_bits=weight_bits, narrow_range=False)
            tfquant.reroute_input(op, index, quantized)
        for op in relus:
            output = op.outputs[0]
            consumers = list(output.consumers())
            with tf.name_scope(op.name + "/peer_act_quant"):
                quantized = tf.quantization.fake_quant_with_min_max_vars(
                    output, tf.stop_gradient(tf.reduce_min(output)), tf.stop_gradient(tf.reduce_max(output)),
                    num_bits=activation_bits, narrow_range=False)
            rewrite.reroute_consumers(output, quantized, consumers)
    return len(layers), len(relus)


class TrainGraph:
    """A ResNet training step (Momentum 0.9) on a fixed in-graph batch, in its own graph.

    quant is None (float), a tfquant.QuantConfig, or ('peer', weight_bits, activation_bits) for
    TensorFlow's fused fake-quant ops.
    """

    def __init__(self, resnet_size, batch_size, quant=None, build_train_op=True, seed=0):
        self.graph = tf.Graph()
        self.report = None
        helper = RandomBatchHelper(resnet_size, batch_size, seed)
        with self.graph.as_default():
            tf1.set_random_seed(seed)
            images, labels = random_batch(batch_size, seed)
            logits = helper.forward_train(tf.constant(images, name="images"))
            self.ops_after_forward = len(self.graph.get_operations())
            if isinstance(quant, tfquant.QuantConfig):
                self.report = tfquant.quantize_graph(self.graph, quant, is_training=True)
            elif quant is not None:
                _, weight_bits, activation_bits = quant
                add_fused_fake_quant(self.graph, weight_bits, activation_bits)
            self.loss, _ = helper.calc_loss(tf.constant(labels, name="labels"), logits, tf1.trainable_variables())
            self.train_op = None
            if build_train_op:
                global_step = tf1.train.get_or_create_global_step()
                optimizer = tf1.train.MomentumOptimizer(0.01, helper.momentum)
                with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
                    self.train_op = optimizer.minimize(self.loss, global_step=global_step)
            self.init_op = tf1.global_variables_initializer()
        self.graph.finalize()
        self.sess = None

    def start(self):
        """Open the session and initialise the variables; returns self."""
        self.sess = tf1.Session(graph=self.graph, config=session_config())
        self.sess.run(self.init_op)
        return self

    def step(self, options=None, run_metadata=None):
        """One training step."""
        self.sess.run(self.train_op, options=options, run_metadata=run_metadata)

    def close(self):
        if self.sess is not None:
            self.sess.close()
            self.sess = None


def build_loss_graph(resnet_size, batch_size):
    """A fresh graph with the ResNet forward pass and loss (no gradients); returns (graph, op count)."""
    graph = tf.Graph()
    helper = RandomBatchHelper(resnet_size, batch_size)
    with graph.as_default():
        images, labels = random_batch(batch_size)
        logits = helper.forward_train(tf.constant(images))
        helper.calc_loss(tf.constant(labels), logits, tf1.trainable_variables())
    return graph, len(graph.get_operations())
