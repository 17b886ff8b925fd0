"""A Keras 3 model rebuilt layer by layer from tf.compat.v1 ops, so its batch norms train as they did in Keras.

Keras 3 layers cannot be called inside a tf.compat.v1 graph with their updates collected, so each layer of the
file's configuration is mapped to the TensorFlow ops Keras itself runs (Conv2D, depthwise, MatMul, fused batch
norm, pooling, ...), its weights turned into variables named by their Keras paths ('conv/kernel',
'bn/moving_mean') with the file's values. In a training graph a BatchNormalization layer normalises with the
batch statistics and adds to UPDATE_OPS the moving-average updates Keras makes (momentum, biased variance); in an
evaluation graph it uses the moving statistics. Dropout is on in training graphs only.

plan() says how a model is rebuilt: a one-input layer (or one called with the same tensor for several inputs,
such as self-attention) of a kind, configuration or data type this module does
not map (a nested model too) runs as its own frozen inference graph (keras3_frozen_layer); a shared layer, a
masked call or an unmapped layer of several inputs makes the whole model fall back to the frozen inference
graph (nets.model_formats.keras3). Either way the reasons name the layers.
"""
import dataclasses
from typing import Dict, List, Tuple

import numpy as np
import tensorflow as tf

from nets.model_formats import keras3_frozen_layer
from nets.model_formats.concrete import variable_name

tf1 = tf.compat.v1
# TensorFlow's fused batch norm raises a smaller epsilon to this; Keras would not, so such layers are not mapped.
_FUSED_MIN_EPSILON = 1.001e-5
_ACTIVATIONS = {
    "linear": lambda x: x, "relu": tf.nn.relu, "relu6": tf.nn.relu6, "sigmoid": tf.sigmoid, "tanh": tf.tanh,
    "softmax": tf.nn.softmax, "elu": tf.nn.elu, "softplus": tf.nn.softplus, "silu": tf.nn.silu, "swish": tf.nn.silu,
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),
}
_MERGES = {"Add": tf.add_n, "Multiply": lambda xs: _pairwise(tf.multiply, xs),
           "Subtract": lambda xs: tf.subtract(*xs), "Maximum": lambda xs: _pairwise(tf.maximum, xs),
           "Minimum": lambda xs: _pairwise(tf.minimum, xs), "Average": lambda xs: tf.add_n(xs) / float(len(xs))}


def _pairwise(binary, tensors):
    result = tensors[0]
    for tensor in tensors[1:]:
        result = binary(result, tensor)
    return result


@dataclasses.dataclass
class FileWeight:
    """One Keras weight as the file holds it: its path ('bn/moving_mean'), value and trainability."""

    path: str
    value: np.ndarray
    trainable: bool


@dataclasses.dataclass
class LayerCall:
    """One call of a layer in the model: its class, configuration, input keys and weights by short name."""

    name: str
    class_name: str
    config: dict
    inputs: List[Tuple[str, int, int]]
    weights: Dict[str, FileWeight]  # by short name ('kernel')
    frozen: object = None  # the PreparedGraph of a layer that runs frozen


@dataclasses.dataclass
class RebuildPlan:
    """The model's layer calls in order, its input and output keys and the variables they need."""

    calls: List[LayerCall]
    input_key: Tuple[str, int, int]
    output_key: Tuple[str, int, int]
    variable_names: Dict[str, str]  # Keras weight path -> variable name
    frozen_layers: List[str] = dataclasses.field(default_factory=list)  # 'name (Class: reason)' of frozen layers

    def initial_values(self):
        """{variable name: the file's value} of every variable the rebuilt model creates."""
        values = {}
        for call in self.calls:
            if call.frozen is not None:
                values.update((p.name, p.value) for p in call.frozen.parameters.values())
            values.update((self.variable_names[w.path], w.value) for w in call.weights.values())
        return values


def _history(argument):
    """The (layer, node, tensor) key of a serialised Keras tensor, or None when it is no tensor."""
    if isinstance(argument, dict) and argument.get("class_name") == "__keras_tensor__":
        layer, node, index = argument["config"]["keras_history"]
        return (layer, int(node), int(index))
    return None


def _call_inputs(node):
    """The input keys of one inbound node ({'args': [...], 'kwargs': {...}}), or None when it is not plain."""
    # Keras records unset keyword arguments ({'mask': None}) and the training flag of the symbolic call, which
    # the model's own call overrides; any other (a mask) does not map.
    if not isinstance(node, dict) or any(value is not None for key, value in (node.get("kwargs") or {}).items()
                                         if key != "training"):
        return None
    args = node.get("args", [])
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = args[0]  # merge layers take one list of tensors
    keys = [_history(argument) for argument in args]
    return None if not keys or None in keys else keys


def _layer_reason(layer, class_name, config, module="keras.layers"):
    """Why a layer (or a Keras operation of a functional model, such as `x + y`) cannot be mapped ('' when it can)."""
    if module == _NUMPY_OPS:
        return "" if class_name in _MERGES and class_name != "Average" else "the Keras operation %s" % class_name
    if not module.startswith("keras.layers"):
        return "a %s.%s" % (module, class_name)
    if class_name not in _BUILDERS:
        return "a %s layer" % class_name
    dtype = getattr(getattr(layer, "dtype_policy", None), "compute_dtype", "float32")
    if dtype != "float32":
        return "computes in %s" % dtype
    if config.get("data_format", "channels_last") != "channels_last":
        return "data_format %s" % config.get("data_format")
    activation = config.get("activation", "linear")
    if not isinstance(activation, str) or activation not in _ACTIVATIONS:
        return "activation %s" % (activation if isinstance(activation, str) else "(custom)")
    if config.get("padding") not in (None, "same", "valid") and class_name != "ZeroPadding2D":
        return "padding %s" % config.get("padding")
    check = _CHECKS.get(class_name)
    return check(layer, config) if check else ""


def _input_rank(layer):
    """The rank of the layer's one input (0 when Keras cannot say)."""
    try:
        return len(layer.input.shape)
    except (AttributeError, ValueError):  # Keras raises ValueError for a layer without one input
        return 0


def _check_conv(layer, config):
    if config.get("groups", 1) != 1:
        return "groups=%s" % config["groups"]
    return "" if len(layer.kernel.shape) == 4 else "kernel of rank %d" % len(layer.kernel.shape)


def _check_batch_norm(layer, config):
    axis = config.get("axis", -1)
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
    rank = _input_rank(layer)
    if rank not in (2, 4) or axis not in (-1, rank - 1):
        return "axis %s of a rank-%d input (expected the last axis of a rank-2 or rank-4 input)" % (axis, rank)
    if config.get("renorm") or config.get("synchronized"):
        return "renorm or synchronized"
    if config.get("epsilon", 1e-3) < _FUSED_MIN_EPSILON:
        return "epsilon %g below TensorFlow's fused minimum %g" % (config["epsilon"], _FUSED_MIN_EPSILON)
    return ""


def _check_relu(layer, config):
    del layer
    return "" if not config.get("negative_slope") and not config.get("threshold") else "negative_slope or threshold"


def _check_dense(layer, config):
    del config
    rank = _input_rank(layer)
    return "" if rank == 2 else "input of rank %d (expected rank 2)" % rank


def _check_dropout(layer, config):
    del layer
    return "" if config.get("noise_shape") is None else "noise_shape"


def plan(model, path=""):
    """Map a loaded Keras 3 model to a RebuildPlan.

    Args:
      model: a Keras 3 Functional or Sequential model.
      path: its file, for messages.
    Returns:
      (RebuildPlan, []) when every layer maps; (RebuildPlan, reasons) when some run frozen (also in
      plan.frozen_layers); (None, reasons naming the layers that prevent a rebuild).
    """
    config = model.get_config()
    layers = config.get("layers", [])
    if "input_layers" not in config:  # a Sequential model: a chain
        chained, previous = [], None
        for index, layer in enumerate(layers):
            entry = dict(layer, name=layer["config"]["name"])
            entry["inbound_nodes"] = [] if previous is None else [
                {"args": [{"class_name": "__keras_tensor__", "config": {"keras_history": [previous, 0, 0]}}]}]
            if index == 0 and layer["class_name"] != "InputLayer":
                return None, ["a Sequential model without an Input"]
            chained.append(entry)
            previous = entry["name"]
        layers, inputs, outputs = chained, [[layers[0]["config"]["name"], 0, 0]], [[previous, 0, 0]]
    else:
        inputs, outputs = config["input_layers"], config["output_layers"]
        inputs = inputs if isinstance(inputs[0], list) else [inputs]
        outputs = outputs if isinstance(outputs[0], list) else [outputs]
    if len(inputs) != 1 or len(outputs) != 1:
        return None, ["%d inputs and %d outputs" % (len(inputs), len(outputs))]
    calls, reasons, variable_names, frozen_layers = [], [], {}, []
    by_name = {operation.name: operation for operation in getattr(model, "operations", model.layers)}
    for entry in layers:
        name, class_name = entry.get("name") or entry["config"]["name"], entry["class_name"]
        if class_name == "InputLayer":
            continue
        layer, module = by_name.get(name), entry.get("module") or "keras.layers"
        nodes = entry.get("inbound_nodes", [])
        keys = _call_inputs(nodes[0]) if len(nodes) == 1 else None
        if layer is None:
            reason = "not found in the model"
        elif keys is None:
            reason = "called %d times, with a mask or with a constant" % len(nodes)
        else:
            reason = _layer_reason(layer, class_name, entry["config"], module)
        repeated = keys is not None and len(set(keys)) == 1 and (len(keys) == 1 or module.startswith("keras.layers"))
        if reason and repeated:
            # A layer of one tensor, passed once or several times (self-attention: MultiHeadAttention(x, x)).
            prepared = keras3_frozen_layer.freeze_layer(layer, path, repeats=len(keys))
            if not isinstance(prepared, str):
                frozen_layers.append("%s (%s: %s)" % (name, class_name, reason))
                variable_names.update(keras3_frozen_layer.frozen_variable_paths(layer, prepared))
                calls.append(LayerCall(name, class_name, entry["config"], keys[:1], {}, prepared))
                continue
            reason = "%s; frozen alone: %s" % (reason, prepared)
        if reason:
            reasons.append("%s (%s: %s)" % (name, class_name, reason))
            continue
        weights = {}
        for weight in getattr(layer, "weights", []):
            with tf.init_scope():  # the values are read eagerly, once
                value = np.asarray(weight.numpy())
            weights[weight.path.rsplit("/", 1)[-1]] = FileWeight(weight.path, value, bool(weight.trainable))
            variable_names[weight.path] = variable_name(weight.path)
        calls.append(LayerCall(name, class_name, entry["config"], keys, weights))
    if len(set(variable_names.values())) != len(variable_names):
        reasons.append("two weights share a variable name")
    if reasons:
        return None, reasons
    return RebuildPlan(calls, tuple(inputs[0]), tuple(outputs[0]), variable_names, frozen_layers), frozen_layers


def _variable(weight, names):
    """The tf.compat.v1 variable of a Keras weight (created with the file's value, or reused)."""
    value = weight.value
    collections = [tf1.GraphKeys.GLOBAL_VARIABLES]
    if weight.trainable:
        collections.append(tf1.GraphKeys.TRAINABLE_VARIABLES)
    elif weight.path.endswith(("moving_mean", "moving_variance")):
        collections.append(tf1.GraphKeys.MOVING_AVERAGE_VARIABLES)
    return tf1.get_variable(names[weight.path], initializer=value, trainable=weight.trainable,
                            collections=collections)


def build(rebuild_plan, inputs, is_training, layer_outputs=None):
    """Build the model on `inputs` inside the caller's variable scope; returns its output tensor.

    Args:
      rebuild_plan: plan()'s RebuildPlan.
      inputs: the image tensor.
      is_training: batch statistics with moving-average updates in UPDATE_OPS, dropout on; else inference.
      layer_outputs: a dict to fill with {layer name: its output tensor}, or None.
    """
    tensors = {rebuild_plan.input_key: inputs}
    for call in rebuild_plan.calls:
        arguments = [tensors[key] for key in call.inputs]
        if call.frozen is not None:
            tensors[(call.name, 0, 0)] = keras3_frozen_layer.import_layer(call.frozen, arguments[0],
                                                                          variable_name(call.name))
            continue
        variables = {short: _variable(weight, rebuild_plan.variable_names) for short, weight in call.weights.items()}
        with tf1.name_scope(variable_name(call.name)):
            output = _BUILDERS[call.class_name](arguments, call.config, variables, is_training)
            activation = call.config.get("activation")
            if activation and call.class_name != "Activation":
                output = _ACTIVATIONS[activation](output)
        tensors[(call.name, 0, 0)] = output
    if layer_outputs is not None:
        layer_outputs.update((key[0], tensor) for key, tensor in tensors.items() if key != rebuild_plan.input_key)
    return tensors[rebuild_plan.output_key]


def _padding(config):
    return config.get("padding", "valid").upper()


def _pair(value):
    return list(value) if isinstance(value, (list, tuple)) else [value, value]


def _conv(xs, config, variables, is_training):
    del is_training
    y = tf.nn.conv2d(xs[0], variables["kernel"], strides=[1] + _pair(config["strides"]) + [1],
                     padding=_padding(config), dilations=[1] + _pair(config.get("dilation_rate", 1)) + [1])
    return tf.nn.bias_add(y, variables["bias"]) if "bias" in variables else y


def _depthwise(xs, config, variables, is_training):
    del is_training
    y = tf.nn.depthwise_conv2d(xs[0], variables["kernel"], strides=[1] + _pair(config["strides"]) + [1],
                               padding=_padding(config), dilations=_pair(config.get("dilation_rate", 1)))
    return tf.nn.bias_add(y, variables["bias"]) if "bias" in variables else y


def _dense(xs, config, variables, is_training):
    del config, is_training
    y = tf.matmul(xs[0], variables["kernel"])
    return tf.nn.bias_add(y, variables["bias"]) if "bias" in variables else y


def _batch_norm(xs, config, variables, is_training):
    x = xs[0]
    rank, channels = x.shape.rank, int(x.shape[-1])
    if rank == 2:
        x = tf.reshape(x, [-1, 1, 1, channels])  # the fused op wants NHWC
    gamma = variables.get("gamma", tf.ones([channels]))
    beta = variables.get("beta", tf.zeros([channels]))
    moving_mean, moving_variance = variables["moving_mean"], variables["moving_variance"]
    epsilon = float(config.get("epsilon", 1e-3))
    # Keras normalises with batch statistics only in a trainable layer's training call (a frozen one, as in
    # transfer learning, keeps its moving statistics).
    if is_training and config.get("trainable", True):
        y, mean, unbiased = tf1.nn.fused_batch_norm(x, gamma, beta, epsilon=epsilon, is_training=True)
        # m <- momentum * m + (1 - momentum) * statistic as assign_sub(m, m * rate - statistic * rate). The fused op
        # returns the variance with Bessel's correction; Keras averages the biased one, so its rate carries
        # (n - 1) / n. Each statistic stays three ops from its update, where tfquant's folding pass looks.
        count = tf.cast(tf.size(x) // channels, tf.float32)
        rate = 1.0 - float(config.get("momentum", 0.99))
        variance_rate = rate * (count - 1.0) / tf.maximum(count, 1.0)
        for moving, batch, batch_rate in ((moving_mean, mean, rate), (moving_variance, unbiased, variance_rate)):
            update = tf1.assign_sub(moving, moving * rate - batch * batch_rate)
            tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, update)
    else:
        y, _, _ = tf1.nn.fused_batch_norm(x, gamma, beta, mean=moving_mean, variance=moving_variance,
                                          epsilon=epsilon, is_training=False)
    return tf.reshape(y, [-1, channels]) if rank == 2 else y


def _relu(xs, config, variables, is_training):
    del variables, is_training
    y = tf.nn.relu(xs[0])
    return y if config.get("max_value") is None else tf.minimum(y, float(config["max_value"]))


def _pool(function):
    def pool(xs, config, variables, is_training):
        del variables, is_training
        size = _pair(config["pool_size"])
        strides = _pair(config.get("strides") or config["pool_size"])
        return function(xs[0], ksize=size, strides=strides, padding=_padding(config))
    return pool


def _global(function):
    def pool(xs, config, variables, is_training):
        del variables, is_training
        return function(xs[0], axis=[1, 2], keepdims=bool(config.get("keepdims")))
    return pool


def _flatten(xs, config, variables, is_training):
    del config, variables, is_training
    return tf.reshape(xs[0], [-1, int(np.prod(xs[0].shape[1:]))])


def _reshape(xs, config, variables, is_training):
    del variables, is_training
    return tf.reshape(xs[0], [-1] + list(config["target_shape"]))


def _dropout(xs, config, variables, is_training):
    del variables
    rate = float(config.get("rate", 0.0))
    return tf.nn.dropout(xs[0], rate=rate, seed=config.get("seed")) if is_training and rate > 0 else xs[0]


def _zero_padding(xs, config, variables, is_training):
    del variables, is_training
    (top, bottom), (left, right) = [_pair(side) for side in config["padding"]]
    return tf.pad(xs[0], [[0, 0], [top, bottom], [left, right], [0, 0]])


def _merge(class_name):
    def merge(xs, config, variables, is_training):
        del config, variables, is_training
        return _MERGES[class_name](xs)
    return merge


def _layer_op(function):
    def apply(xs, config, variables, is_training):
        del variables, is_training
        return function(xs[0], config)
    return apply


_BUILDERS = {
    "Conv2D": _conv, "DepthwiseConv2D": _depthwise, "Dense": _dense, "BatchNormalization": _batch_norm,
    "ReLU": _relu, "MaxPooling2D": _pool(tf.nn.max_pool2d), "AveragePooling2D": _pool(tf.nn.avg_pool2d),
    "GlobalAveragePooling2D": _global(tf.reduce_mean), "GlobalMaxPooling2D": _global(tf.reduce_max),
    "Flatten": _flatten, "Reshape": _reshape, "Dropout": _dropout, "ZeroPadding2D": _zero_padding,
    "Activation": _layer_op(lambda x, config: _ACTIVATIONS[config["activation"]](x)),
    "LeakyReLU": _layer_op(lambda x, config: tf.nn.leaky_relu(x, alpha=float(config.get("negative_slope", 0.3)))),
    "Softmax": _layer_op(lambda x, config: tf.nn.softmax(x, axis=config.get("axis", -1))),
    "Rescaling": _layer_op(lambda x, config: x * float(config["scale"]) + float(config.get("offset", 0.0))),
    "Concatenate": lambda xs, config, variables, is_training: tf.concat(xs, axis=config.get("axis", -1)),
    "Identity": _layer_op(lambda x, config: tf.identity(x)),
}
_BUILDERS.update({name: _merge(name) for name in _MERGES})
_NUMPY_OPS = "keras.src.ops.numpy"  # the module of `x + y` and its kind in a functional model's configuration
_CHECKS = {"Conv2D": _check_conv, "DepthwiseConv2D": _check_conv, "BatchNormalization": _check_batch_norm,
           "ReLU": _check_relu, "Dense": _check_dense, "Dropout": _check_dropout,
           "Rescaling": lambda layer, config: "" if np.ndim(config["scale"]) == 0 and np.ndim(
               config.get("offset", 0.0)) == 0 else "per-channel scale or offset"}
