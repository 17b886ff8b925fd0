"""The quantized model's activation grids written into a saved Keras 3 file, with Keras's own operations.

tfquant quantizes an activation in its evaluation graph with plain float32 arithmetic on the recorded range
(tfquant.ops.quantize_in_range, or quantize_zero_exact with --uql_quantize_layer_outputs). The same operations
(subtract, multiply, clip, round, multiply, add; keras.ops, which a functional model serialises as built-in
operations that safe mode loads) go after each Keras layer whose output the quantizer reads, so that a plain
`keras.saving.load_model` reproduces the quantized activations bit for bit. (Discretization + Rescaling would
also load safely, but rounds half up and compares against precomputed boundaries, so values near a boundary
could fall on the other level.)
"""
import dataclasses

import numpy as np
import tensorflow as tf

from nets.model_formats import keras3_graph
from tfquant import match

tf1 = tf.compat.v1


@dataclasses.dataclass
class ActivationGrid:
    """One quantized activation: its graph op, bits, recorded range and which of tfquant's two grids."""

    op_name: str
    bits: int
    minimum: np.float32
    maximum: np.float32
    zero_exact: bool

    def apply(self, keras, x):
        """The Keras operations that put `x` on this grid, as tfquant's evaluation graph computes it."""
        ops = keras.ops
        top = float(2 ** self.bits - 1)
        if not self.zero_exact:  # tfquant.ops.quantize_in_range(clip=True)
            alpha = np.maximum(self.maximum - self.minimum, np.float32(0)) + np.float32(1e-10)
            inverse = np.float32(top) / alpha
            step = alpha * np.float32(1.0 / top)
            codes = ops.round(ops.clip(ops.multiply(ops.subtract(x, float(self.minimum)), float(inverse)), 0.0, top))
            return ops.add(ops.multiply(codes, float(step)), float(self.minimum))
        # tfquant.ops.quantize_zero_exact: the nudged range of FakeQuantWithMinMaxVars, rounded half up.
        low = np.minimum(self.minimum, np.float32(0))
        high = np.maximum(np.maximum(self.maximum, np.float32(0)), low + np.float32(1e-10))
        step = (high - low) * np.float32(1.0 / top)
        zero_point = np.clip(np.floor(-low / step + np.float32(0.5)), np.float32(0), np.float32(top))
        nudged_low, nudged_high = -zero_point * step, (np.float32(top) - zero_point) * step
        clipped = ops.maximum(ops.minimum(x, float(nudged_high)), float(nudged_low))
        codes = ops.floor(ops.add(ops.multiply(ops.subtract(clipped, float(nudged_low)),
                                               float(np.float32(1.0) / step)), 0.5))
        return ops.add(ops.multiply(codes, float(step)), float(nudged_low))


def activation_grids(report, checkpoint):
    """The report's quantized activations as ActivationGrids, and the names of those that cannot be written.

    Args:
      report: the run's QuantReport (tfquant.report.load_report).
      checkpoint: the checkpoint prefix holding the recorded ranges.
    Returns:
      ([ActivationGrid], [op names of quantized activations whose range is not a recorded moving average]).
    """
    reader = tf.train.load_checkpoint(checkpoint)
    zero_exact = bool(report.config.get("quantize_layer_outputs"))
    grids, unsupported = [], []
    for layer in report.layers:
        if layer.kind == "weight" or layer.status != "quantized":
            continue
        variables = layer.range_variables or []
        names = [v for v in variables if v.endswith(("/ema_min", "/ema_max"))]
        steps = names[0].rsplit("/", 1)[0] + "/ema_steps" if names else None
        if len(names) != 2 or not reader.has_tensor(steps) or reader.get_tensor(steps) <= 0:
            unsupported.append(layer.name)  # a batch, PACT or LSQ range, or none recorded
            continue
        low, high = (np.float32(reader.get_tensor(n)) for n in sorted(names, key=lambda n: n.endswith("max")))
        grids.append(ActivationGrid(layer.name, int(layer.bits), low, high, zero_exact))
    return grids, unsupported


def layer_of_ops(rebuild_plan, input_shape, scope, before_activation=None, tensors=None):
    """{op name in the rebuilt evaluation graph: the Keras layer whose output it is}.

    before_activation: a dict to fill with {op name: layer name} of the ops computing a layer's output before its
    own activation (a Dense's logits before its softmax).
    tensors: a dict {report name: None} to fill with (op name of the tensor it names, whether that is the model
    input): a layer output or input the report names after its weight op ('<op>:output', '<op>:input').
    """
    graph = tf.Graph()
    outputs = {}
    with graph.as_default():
        images = tf1.placeholder(tf.float32, input_shape)
        with tf1.variable_scope(scope):
            keras3_graph.build(rebuild_plan, images, is_training=False, layer_outputs=outputs)
    found = {}
    for layer_name, tensor in outputs.items():
        op = tensor.op
        found.setdefault(op.name, layer_name)
        while op.type == "Identity" and op.inputs:  # a frozen layer's output is an Identity of its last op
            op = op.inputs[0].op
            found.setdefault(op.name, layer_name)
        if before_activation is not None and op.type in ACTIVATION_TYPES and op.inputs:
            before_activation.setdefault(op.inputs[0].op.name, layer_name)
    for name in list(tensors or ()):
        try:
            tensor = match.integer_tensor(graph, name)
        except (KeyError, ValueError):
            continue
        tensors[name] = (tensor.op.name, tensor.op is images.op)
    return found


# Ops a Keras layer's own `activation` ends in, whose input is the layer's output before it.
ACTIVATION_TYPES = ("Softmax", "Relu", "Relu6", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus")


def _is_model_input(keras_tensor):
    history = getattr(keras_tensor, "_keras_history", None)
    return history is not None and type(history[0]).__name__ == "InputLayer"


def split_separable(keras, layer, inputs, grid):
    """A SeparableConv2D's call as DepthwiseConv2D, `grid`, then a 1x1 Conv2D (with its bias and activation): the
    quantized graph rounds the depthwise output inside the layer, which a Keras layer cannot hold. The two layers
    run the ops Keras's SeparableConv2D runs on TensorFlow (DepthwiseConv2dNative, then Conv2D, bias, activation).

    Returns:
      the output tensor, or None when the layer is not a 2D channels_last SeparableConv2D.
    """
    config = layer.get_config()
    if type(layer).__name__ != "SeparableConv2D" or config.get("data_format", "channels_last") != "channels_last":
        return None
    depthwise = keras.layers.DepthwiseConv2D(
        config["kernel_size"], strides=config["strides"], padding=config["padding"],
        depth_multiplier=config["depth_multiplier"], dilation_rate=config["dilation_rate"], use_bias=False,
        name=layer.name + "_depthwise")
    pointwise = keras.layers.Conv2D(config["filters"], 1, use_bias=config["use_bias"],
                                    activation=config["activation"], name=layer.name + "_pointwise")
    x = depthwise(inputs)
    depthwise.set_weights([layer.depthwise_kernel.numpy()])
    output = pointwise(grid.apply(keras, x))
    pointwise.set_weights([layer.pointwise_kernel.numpy()] + ([layer.bias.numpy()] if config["use_bias"] else []))
    return output


ATTENTION_PROJECTIONS = ("query", "key", "value")


def split_attention(keras, layer, args, kwargs, grids):
    """A MultiHeadAttention call as its query/key/value projections (EinsumDense layers with its kernels, no bias),
    the grids the quantized graph puts on their outputs, then a MultiHeadAttention whose own projections are
    identities (exact in float: one product by 1, the rest by 0) adding the layer's biases, and whose output
    projection is the layer's.

    Args:
      grids: {'query' | 'key' | 'value': ActivationGrid} (a projection without one stays float).
    Returns:
      the output tensor, or None when the layer is not a MultiHeadAttention without a gate called on 2-3 tensors.
    """
    config = layer.get_config()
    if type(layer).__name__ != "MultiHeadAttention" or config.get("use_gate") or not 2 <= len(args) <= 3:
        return None
    query, value = args[0], args[1]
    sources = {"query": query, "value": value, "key": args[2] if len(args) == 3 else value}
    heads, key_dim = int(config["num_heads"]), int(config["key_dim"])
    value_dim = int(config.get("value_dim") or key_dim)
    projected = {}
    for part in ATTENTION_PROJECTIONS:
        original = getattr(layer, "_%s_dense" % part)
        # Without its bias: the quantized graph rounds the MatMul's output, before the bias (which the identity
        # projection below adds).
        projection = keras.layers.EinsumDense.from_config(dict(original.get_config(), bias_axes=None,
                                                               name="%s_%s" % (layer.name, part)))
        x = projection(sources[part])
        projection.set_weights([original.kernel.numpy()])
        if part in grids:
            x = grids[part].apply(keras, x)
        width = heads * (value_dim if part == "value" else key_dim)
        projected[part] = keras.layers.Reshape(tuple(x.shape[1:-2]) + (width,), name="%s_%s_heads" % (
            layer.name, part))(x)
    config["output_shape"] = config.get("output_shape") or int(query.shape[-1])
    attention = layer.__class__.from_config(config)
    output = attention(projected["query"], projected["value"], projected["key"], **kwargs)
    values = []
    for weight in attention.weights:
        part, kind = weight.path.split("/")[-2:]
        if part in ATTENTION_PROJECTIONS:  # identity: input feature h * dim + d is output (h, d); the layer's bias
            shape = tuple(weight.shape)
            values.append(np.eye(shape[0], dtype=np.float32).reshape(shape) if kind == "kernel"
                          else getattr(layer, "_%s_dense" % part).bias.numpy())
        else:
            values.append(getattr(layer, "_output_dense").get_weights()[0 if kind == "kernel" else 1])
    attention.set_weights(values)
    return output


def split_dense(keras, layer, x, grids):
    """A Dense call on a rank-3+ input whose Tensordot MatMul the quantized graph quantizes: `grids['input']` on its
    input, the Dense without bias and activation, `grids['output']` (before the bias, where the MatMul's output is),
    then the bias as an EinsumDense with an identity kernel (exact in float) and the activation as its own layer.

    Returns:
      the output tensor, or None when the layer is not a Dense.
    """
    config = layer.get_config()
    if type(layer).__name__ != "Dense":
        return None
    if "input" in grids:
        x = grids["input"].apply(keras, x)
    if "output" not in grids:
        return layer(x)
    units, use_bias, activation = int(config["units"]), config.get("use_bias", True), config.get("activation")
    dense = layer.__class__.from_config(dict(config, use_bias=False, activation="linear"))
    y = dense(x)
    dense.set_weights([layer.kernel.numpy()])
    y = grids["output"].apply(keras, y)
    if use_bias:
        bias = keras.layers.EinsumDense("...c,cd->...d", output_shape=units, bias_axes="d", name=layer.name + "_bias")
        y = bias(y)
        bias.set_weights([np.eye(units, dtype=np.float32), layer.bias.numpy()])
    if activation not in (None, "linear"):
        y = keras.layers.Activation(activation, name=layer.name + "_activation")(y)
    return y


def split_layer_norm(keras, layer, x, grid):
    """A LayerNormalization (last axis, center and scale) whose offset `beta - mean * rsqrt(variance + epsilon) *
    gamma` the quantized graph rounds: the ops Keras's layer runs on TensorFlow, in its order, with keras.ops, gamma
    as an EinsumDense kernel (one product per element) and beta as an identity EinsumDense's bias, `grid` on the
    offset. Returns the output tensor, or None when the layer is not such a LayerNormalization."""
    config = layer.get_config()
    axis = config.get("axis", -1)
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
    if type(layer).__name__ != "LayerNormalization" or config.get("rms_scaling") or not (
            config.get("center", True) and config.get("scale", True)) or axis not in (-1, len(x.shape) - 1):
        return None
    ops, channels = keras.ops, int(x.shape[-1])
    mean = ops.mean(x, axis=-1, keepdims=True)
    variance = ops.mean(ops.square(ops.subtract(x, mean)), axis=-1, keepdims=True)
    inverse = ops.rsqrt(ops.add(variance, float(np.float32(config.get("epsilon", 1e-3)))))
    scale = keras.layers.EinsumDense("...x,xc->...c", output_shape=channels, name=layer.name + "_scale")
    multiplier = scale(inverse)  # rsqrt(variance + epsilon) * gamma
    scale.set_weights([layer.gamma.numpy().reshape(1, channels)])
    center = keras.layers.EinsumDense("...c,cd->...d", output_shape=channels, bias_axes="d",
                                      name=layer.name + "_offset")
    offset = center(ops.multiply(ops.negative(mean), multiplier))
    center.set_weights([np.eye(channels, dtype=np.float32), layer.beta.numpy()])
    return ops.add(ops.multiply(x, multiplier), grid.apply(keras, offset))


def _reserve_names(keras, model):
    """Make Keras's automatic names skip the model's own: a loaded file's operations ('add' of `x + y`) keep their
    saved names without counting them, so a grid's keras.ops.add would be named 'add' too (refused on saving)."""
    for operation in getattr(model, "operations", model.layers):
        prefix, _, number = operation.name.rpartition("_")
        prefix, number = (prefix, int(number)) if prefix and number.isdigit() else (operation.name, 0)
        while keras.backend.get_uid(prefix) < number + 1:
            pass


def with_quantized_activations(keras, model, grids_by_layer, input_grid=None, before_activation=None,
                               inside_separable=None, inside_attention=None, inside_dense=None,
                               inside_layer_norm=None):
    """A functional copy of `model` (its layers shared) with each grid applied after its layer's output.

    Args:
      keras: the Keras 3 module.
      model: a Functional or Sequential Keras 3 model.
      grids_by_layer: {layer name: ActivationGrid}.
      input_grid: the ActivationGrid of the model input, or None (applied where a layer reads the input).
      before_activation: {layer name: ActivationGrid} of layers quantized before their own activation (a Dense's
        logits before its softmax, what an int8 model's output holds): the copy runs such a layer without its
        activation (a new layer of the same name and weights), the grid, then the activation as its own layer.
      inside_separable: {layer name: ActivationGrid} of SeparableConv2D layers whose depthwise output is quantized:
        the copy runs them as two layers with the grid between (split_separable).
      inside_attention: {layer name: {'query' | 'key' | 'value': ActivationGrid}} of MultiHeadAttention layers whose
        projections' outputs are quantized (split_attention).
      inside_dense: {layer name: {'input' | 'output': ActivationGrid}} of Dense layers on rank-3 inputs whose
        Tensordot MatMul is quantized (split_dense).
      inside_layer_norm: {layer name: ActivationGrid} of LayerNormalization layers whose offset is quantized
        (split_layer_norm).
    Returns:
      (the model, the names of the layers whose grids it applies, with '(input)' for the input's: clone_model
      calls back for layers only, not for a functional model's Keras operations such as `x + y`).
    """
    before_activation = dict(before_activation or {})
    inside_separable = dict(inside_separable or {})
    inside_attention = dict(inside_attention or {})
    inside_dense = dict(inside_dense or {})
    inside_layer_norm = dict(inside_layer_norm or {})
    _reserve_names(keras, model)
    if isinstance(model, keras.Sequential):
        inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
        x = inputs
        for layer in model.layers:
            x = layer(x)
        model = keras.Model(inputs, x, name=model.name)

    applied, linear = set(), {}

    def clone(layer):
        if layer.name not in before_activation or getattr(layer, "activation", None) is None:
            return layer
        config = layer.get_config()
        activation, config["activation"] = config["activation"], "linear"
        linear[layer.name] = (layer, layer.__class__.from_config(config), activation)
        return linear[layer.name][1]

    def call(layer, *args, **kwargs):
        if input_grid is not None and args and _is_model_input(args[0]):
            applied.add(INPUT_LAYER)
            args = (input_grid.apply(keras, args[0]),) + args[1:]
        output = None
        if layer.name in inside_separable and len(args) == 1:
            output = split_separable(keras, layer, args[0], inside_separable[layer.name])
            if output is not None:
                applied.add(SEPARABLE_PREFIX + layer.name)
        if layer.name in inside_attention:
            output = split_attention(keras, layer, args, kwargs, inside_attention[layer.name])
            if output is not None:
                applied.update(ATTENTION_PREFIX + layer.name + "/" + part for part in inside_attention[layer.name])
        if layer.name in inside_dense and len(args) == 1 and not kwargs.get("mask"):
            output = split_dense(keras, layer, args[0], inside_dense[layer.name])
            if output is not None:
                applied.update(DENSE_PREFIX + layer.name + "/" + part for part in inside_dense[layer.name])
        if layer.name in inside_layer_norm and len(args) == 1 and output is None:
            output = split_layer_norm(keras, layer, args[0], inside_layer_norm[layer.name])
            if output is not None:
                applied.add(LAYER_NORM_PREFIX + layer.name)
        if output is None:
            output = layer(*args, **kwargs)
        if layer.name in linear:
            applied.add(layer.name)
            output = before_activation[layer.name].apply(keras, output)
            return keras.layers.Activation(linear[layer.name][2], name=layer.name + "_activation")(output)
        grid = grids_by_layer.get(layer.name)
        if grid is None:
            return output
        applied.add(layer.name)
        return grid.apply(keras, output)

    copy = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for original, replacement, _ in linear.values():
        replacement.set_weights(original.get_weights())
    return copy, applied


INPUT_LAYER = "(input)"
SEPARABLE_PREFIX = "(inside) "
ATTENTION_PREFIX = "(attention) "
DENSE_PREFIX = "(dense) "
LAYER_NORM_PREFIX = "(layer norm) "
