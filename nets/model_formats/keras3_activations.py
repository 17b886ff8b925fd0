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


def layer_of_ops(rebuild_plan, input_shape, scope):
    """{op name in the rebuilt evaluation graph: the Keras layer whose output it is}."""
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
    return found


def with_quantized_activations(keras, model, grids_by_layer):
    """A functional copy of `model` (its layers shared) with each grid applied after its layer's output.

    Args:
      keras: the Keras 3 module.
      model: a Functional or Sequential Keras 3 model.
      grids_by_layer: {layer name: ActivationGrid}.
    Returns:
      (the model, the names of the layers whose grids it applies: clone_model calls back for layers only, not
      for a functional model's Keras operations such as `x + y`).
    """
    if isinstance(model, keras.Sequential):
        inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
        x = inputs
        for layer in model.layers:
            x = layer(x)
        model = keras.Model(inputs, x, name=model.name)

    applied = set()

    def call(layer, *args, **kwargs):
        output = layer(*args, **kwargs)
        grid = grids_by_layer.get(layer.name)
        if grid is None:
            return output
        applied.add(layer.name)
        return grid.apply(keras, output)

    copy = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    return copy, applied
