"""A frozen inference graph whose quantization is FakeQuant ops carrying tfquant's trained ranges.

Integer converters (TFLite's, tf2onnx's Q/DQ) understand `fake_quant_with_min_max_vars(_per_channel)`,
not tfquant's round/clip subgraphs. This graph puts one on:

* every matmul-like weight: the packed file's dequantized weight with its own range. On a grid an int8
  kernel holds (the symmetric grid, weight_scheme='symmetric') with k <= 8 bits the FakeQuant is k-bit
  narrow-range with zero point 0, the grid tfquant trained, so the integer weight is exactly the trained
  one ("exact"), per output channel on a depthwise kernel too (through a [H, W, 1, C * M] view, which the
  converters take); the other grids (the weight grid's int8_reason), 'split' buckets, per-channel ranges on ops
  whose int8 kernels take one range and layers kept float are re-gridded to 8-bit symmetric ("rounded", with the
  reason). A MatMul with per-channel symmetric ranges is deployed as a 1x1 convolution, whose kernel takes them
  ("exact");
* every activation tfquant quantized with a stored range (act_range 'ema'): its trained [min, max]
  with its own bits ("trained");
* the tensors integer kernels need a range for that training never quantized (the input, a layer's
  output that feeds no trained activation, e.g. before a residual add, and the logits): min/max over
  calibration images run through the graph ("calibrated", the labelled fallback). A run trained with
  QuantConfig.quantize_layer_outputs has trained ranges for them all (see tfquant.match.find_integer_tensors)
  and needs no calibration images.

What training keeps float stays float in TFLite's int8 file: a two-input AddN (Keras 3's Add layer) becomes an
AddV2, which TFLite runs as an ADD (int8 where both inputs are quantized; it has no int8 ADD_N, and ran the sum in
float after rounding both inputs onto the sum's grid), and a mean of a quantized tensor without a FakeQuant after it (a
LayerNormalization's mean) becomes a sum over the count, which the converter leaves float (an int8 MEAN rounds
onto its input's grid). The same float values in TensorFlow; ONNX files built from this graph hold the same.
"""
import dataclasses

import numpy as np
import tensorflow as tf

from tfquant import fold, match, ops, rewrite, weight_grids
from tfquant.config import FLOAT_BITS
from tfquant.export import frozen_graph, inference_graph, model_export, tflite_export
from tfquant.report import layer_layout, load_report

tf1 = tf.compat.v1
INT8_BITS = 8


@dataclasses.dataclass
class FakeQuantGraph:
    """The frozen graph and what each of its FakeQuant ops carries.

    graph_def: GraphDef with 'input' and 'logits'. weights: per weight layer {layer, bits, int8:
    'exact' | 'rounded', reason}. activations: per range {tensor, source: 'trained' | 'calibrated', min,
    max, bits[, fake_quant_range]}. input_range: (min, max) of the input FakeQuant. calibration_images: images used.
    biases_on_grid: layers whose bias is on the int32 grid of the evaluation graph. float_means: the means of
    quantized tensors computed as a sum over the count, so that TFLite keeps them float as training does.
    """

    graph_def: object
    weights: list
    activations: list
    input_range: tuple
    calibration_images: int
    biases_on_grid: list = dataclasses.field(default_factory=list)
    float_means: list = dataclasses.field(default_factory=list)

    def summary(self):
        """JSON-able description for export.json."""
        counts = {}
        for record in self.activations:
            counts[record["source"]] = counts.get(record["source"], 0) + 1
        return {"weights": self.weights, "activation_ranges": counts,
                "calibration_images": self.calibration_images, "biases_on_int32_grid": len(self.biases_on_grid),
                "means_kept_float": self.float_means,
                "calibrated_tensors": [r["tensor"] for r in self.activations if r["source"] == "calibrated"]}

    def not_as_trained(self):
        """What the int8 / ONNX files hold that the trained graph does not compute: {"weights": {reason: [layers
        re-gridded to 8-bit symmetric]}, "calibrated": [tensors training never quantized]}; {} when the files hold
        the trained grids and ranges."""
        weights = {}
        for record in self.weights:
            if record["int8"] != "exact":
                weights.setdefault(record["reason"], []).append(record["layer"])
        calibrated = [r["tensor"] for r in self.activations if r["source"] == "calibrated"]
        return {key: value for key, value in (("weights", weights), ("calibrated", calibrated)) if value}


def _as_convolution(op, index):
    """Whether MatMul `op` can run as a 1x1 convolution: a [batch, C] input times its [C, K] weight (or
    [K, C] with transpose_b), so that per-channel weight ranges reach the int8 file. TFLite's converter
    refuses a per-channel FakeQuant on a MatMul weight (its FullyConnected weight is the transpose, and
    the transpose would move the quantized axis), and a 1x1 Conv2D kernel takes them. A BatchMatMulV2 of a
    [..., C] input and one [C, K] weight shared by the batch (Keras 3's EinsumDense: attention projections)
    is the same product on every row; its int8 kernel (FULLY_CONNECTED) would take one range."""
    if index != 1 or not op.inputs[index].shape.is_fully_defined():
        return False
    if op.type == "MatMul":
        return not op.get_attr("transpose_a") and op.inputs[0].shape.rank == 2
    if op.type == "BatchMatMulV2":
        rank = op.inputs[0].shape.rank
        return (not op.get_attr("adj_x") and op.inputs[index].shape.rank == 2 and rank is not None and rank >= 2
                and op.inputs[0].shape[-1] is not None)
    return False


def _transposed(op):
    """Whether the weight (input 1) of a MatMul or BatchMatMulV2 is read transposed."""
    return op.get_attr("transpose_b" if op.type == "MatMul" else "adj_y")


def _per_channel_depthwise(op, index):
    """Whether `op` is a depthwise convolution whose kernel (input `index`) has a known [H, W, C, M] shape: its
    per-channel ranges reach the int8 files through a [H, W, 1, C * M] view (TFLite's DEPTHWISE_CONV_2D and ONNX's
    grouped Conv take one range per output channel)."""
    return (op.type == "DepthwiseConv2dNative" and index == 1 and op.inputs[index].shape.rank == 4
            and op.inputs[index].shape.is_fully_defined())


def _per_channel_fake_quant(kernel, value, bits):
    """FakeQuant of a [..., K] kernel with one symmetric range per output channel (max |value|)."""
    amax = np.abs(value).max(axis=tuple(range(value.ndim - 1)))
    amax = np.maximum(amax, np.float32(1e-8)).astype(np.float32)
    return tf.quantization.fake_quant_with_min_max_vars_per_channel(
        kernel, tf.constant(-amax), tf.constant(amax), num_bits=bits, narrow_range=True)


def _weight_fake_quant(op, index, value, layer, grid):
    """Reroute op's weight through a FakeQuant with the weight's range, `grid` the run's WeightGrid (or the name of
    its weight_scheme).

    Returns:
      (the layer's record, replaced): `replaced` maps the name of an output whose readers moved to a new
      tensor (a MatMul deployed as a 1x1 convolution) to that tensor; empty otherwise.
    """
    if not isinstance(grid, weight_grids.WeightGrid):
        grid = weight_grids.for_config({"weight_scheme": grid})
    quantized = layer is not None and layer.quantized and layer.bits != FLOAT_BITS
    channel_grid = layer is None or layer.bucket_type == "channel" or not quantized
    # One range per output channel where the trained grid has one and an int8 kernel takes them (Conv2D,
    # channel axis last; a MatMul run as a 1x1 Conv2D); a per-layer grid keeps one range, or its step
    # would change.
    as_convolution = channel_grid and quantized and not grid.int8_reason and _as_convolution(op, index)
    depthwise = channel_grid and _per_channel_depthwise(op, index)
    per_channel = channel_grid and (op.type == "Conv2D" or as_convolution or depthwise)
    reason = ""
    if not quantized:
        reason = "kept float in training"
    elif grid.int8_reason:
        reason = grid.int8_reason
    elif layer.bucket_type in ("split", "block"):
        reason = "%s buckets" % layer.bucket_type
    elif layer.bucket_type == "channel" and not per_channel:
        reason = "per-channel ranges on a %s, whose int8 kernel takes one range" % op.type
    bits = layer.bits if not reason else INT8_BITS
    weight = op.inputs[index]
    replaced = {}
    with op.graph.name_scope(None), op.graph.name_scope(op.name + "/weight_fake_quant"):
        if as_convolution:
            kernel, kernel_value = weight, value
            if _transposed(op):
                kernel, kernel_value = tf.transpose(kernel), value.T
            channels, outputs = kernel_value.shape
            tensor = _per_channel_fake_quant(tf.reshape(kernel, [1, 1, channels, outputs]),
                                             kernel_value.reshape([1, 1, channels, outputs]), bits)
            data = op.inputs[0]
            inputs = tf.reshape(data, [-1, 1, 1, channels])
            if data.shape.rank == 2:
                shape = [-1, outputs]
            else:  # a BatchMatMulV2's rows back in their batch dimensions
                shape = tf.concat([tf.shape(data)[:-1], [outputs]], 0)
            result = tf.reshape(tf.nn.conv2d(inputs, tensor, 1, "VALID"), shape, name="as_convolution")
            result.set_shape(op.outputs[0].shape)
        elif depthwise:
            # The converters take per-channel ranges on the last axis; a depthwise kernel [H, W, C, M] has its C * M
            # output channels on the last two (TFLite's own layout [1, H, W, C * M]).
            height, width, channels, multiplier = value.shape
            flat = [height, width, 1, channels * multiplier]
            fake_quant = _per_channel_fake_quant(tf.reshape(weight, flat), value.reshape(flat), bits)
            tensor = tf.reshape(fake_quant, value.shape, name="per_channel")
        elif per_channel:
            tensor = _per_channel_fake_quant(weight, value, bits)
        else:
            amax = np.maximum(np.float32(np.abs(value).max()), np.float32(1e-8)).astype(np.float32)
            tensor = tf.quantization.fake_quant_with_min_max_vars(
                weight, tf.constant(-amax), tf.constant(amax), num_bits=bits, narrow_range=True)
    # The FakeQuant's own output (a depthwise kernel's is reshaped back after it): what the k-bit ONNX export
    # replaces by the trained codes.
    record = {"layer": op.name, "bits": int(bits), "int8": "rounded" if reason else "exact", "reason": reason,
              "tensor": (fake_quant if depthwise else tensor).name}
    if as_convolution:
        # The MatMul's readers move to the convolution; the MatMul itself is left without a reader and
        # drops out of the frozen graph.
        rewrite.reroute_consumers(op.outputs[0], result, list(op.outputs[0].consumers()))
        replaced[op.outputs[0].name] = result
        record["deployed_as"] = "1x1 Conv2D"
    else:
        rewrite.reroute_input(op, index, tensor)
    return record, replaced


def on_eval_grid(low, high, bits):
    """(min, max) of a FakeQuant whose grid is the evaluation graph's for a trained range [low, high], or None.

    The evaluation graph's step is (max(high, 0) - min(low, 0)) * float32(1/(2^k-1)) (ops.zero_exact_step) and
    its zero point floor(-low / step + 0.5); a FakeQuant given [low, high] divides by 2^k-1 instead, which is an
    ulp off for many ranges. The range returned is the nudged grid itself, [-zero point, 2^k-1 - zero point]
    times the step, its top moved by a few ulps so that the converters (tf2onnx, TFLite: the float64 quotient
    as float32) derive exactly that step and zero point, and TensorFlow's FakeQuant kernel (float32 quotient)
    too where some top gives it; None when no top near the grid's gives the converters the step.
    """
    levels = (1 << bits) - 1
    low32 = np.minimum(np.float32(low), np.float32(0.0))
    high32 = np.maximum(np.maximum(np.float32(high), np.float32(0.0)), low32 + np.float32(ops.RANGE_EPS))
    step = np.float32(np.float32(high32 - low32) * np.float32(1.0 / levels))
    zero_point = np.clip(np.floor(np.float32(-low32 / step) + np.float32(0.5)), 0, levels)
    nudged_low = np.float32(-zero_point * step)
    if np.round(-float(nudged_low) / float(step)) != zero_point:
        return None
    up = down = np.float32((levels - zero_point) * step)
    tops = [up]
    for _ in range(8):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        tops += [up, down]
    converter_only = None
    for top in tops:
        if np.float32((float(top) - float(nudged_low)) / levels) != step:
            continue
        if np.float32(np.float32(top - nudged_low) / np.float32(levels)) == step:
            return float(nudged_low), float(top)
        converter_only = converter_only or (float(nudged_low), float(top))
    return converter_only


def _insert_range(tensor, low, high, bits, source, records, exact_grid=False):
    """Put a FakeQuant with [low, high] (widened to hold 0) after `tensor`, moving its readers; returns its output.

    exact_grid: a trained range, given the evaluation graph's grid (on_eval_grid) where it can be; the record keeps
    the trained [min, max] and adds the FakeQuant's own range as fake_quant_range.
    """
    low, high = float(min(low, 0.0)), float(max(high, 0.0))
    if high - low < 1e-8:
        high = low + 1e-8
    record = {"tensor": tensor.op.name, "source": source, "min": low, "max": high, "bits": int(bits)}
    found = on_eval_grid(low, high, bits) if exact_grid else None
    if found is not None:
        low, high = found
        record["fake_quant_range"] = [low, high]
    name = tensor.op.name + "/fake_quant"
    quantized, _, _ = rewrite.insert_after(tensor, lambda t: (tf.quantization.fake_quant_with_min_max_vars(
        t, low, high, num_bits=bits), None), name)
    records.append(record)
    return quantized


def _quantize_biases(graph, candidates, weight_layers, config, replaced, input_steps, weight_steps=None):
    """Put each bias a symmetric-grid weight layer adds on the int32 grid of its input's step times its weight's,
    as tfquant.quantize.quantize_biases does in the evaluation graph.

    Args:
      graph: the graph, weight FakeQuants and trained activation ranges in place.
      candidates: the weight candidates (op, input_index, their original weight tensor as `weight`).
      weight_layers: {op name: weight LayerReport}.
      config: the report's settings (each layer's WeightGrid is the one the policy gave it).
      replaced: {MatMul output name: the 1x1 convolution's output now computing it}.
      input_steps: {FakeQuant output name: its step} of the trained activation ranges (the evaluation graph's
        integer steps: ranges it quantizes on the zero-exact grid).
      weight_steps: {weight variable: float32 step per range group} as the packed file stores it (packed_steps);
        a layer not in it gets the step recomputed from its dequantized weight.
    Returns:
      the names of the layers whose bias was put on the int32 grid.
    """
    done = []
    for candidate, weight in candidates:
        op = candidate.op
        layer = weight_layers.get(op.name)
        layout = layer_layout(layer) if layer is not None and layer.quantized else None
        grid = weight_grids.for_layer(layer, config) if layout is not None else None
        if layout is None or not grid.integer_kernel_grid or not grid.has_integer_step(layout):
            continue
        input_step = input_steps.get(match.grid_source(op.inputs[match.data_operand_index(op)]).name)
        output = replaced.get(op.outputs[0].name, op.outputs[0])
        bias_add = match.bias_reader(output)
        if input_step is None or bias_add is None:
            continue
        index = 1 if bias_add.inputs[0] is output else 0
        with graph.name_scope(None), graph.name_scope(op.name + "/bias_quant"):
            # The evaluation graph's step is alpha * float32(1/(2^k-1)) of the trained weight, which the packed file
            # stores; recomputed from the dequantized weight (max|w| / Q) it is off by an ulp in most channels,
            # which moved the bias, and so outputs near a rounding boundary, off the trained graph's (issue 32).
            step = (weight_steps or {}).get(candidate.variable_name)
            weight_step = (grid.integer_step(weight, layer.bits, layout) if step is None
                           else tf.constant(np.reshape(step, [-1] if np.size(step) > 1 else []), tf.float32))
            rewrite.reroute_input(bias_add, index, ops.quantize_bias(bias_add.inputs[index], input_step * weight_step))
        done.append(op.name)
    return done


_FAKE_QUANT_TYPES = ("FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxArgs")


def _means_kept_float(graph):
    """Compute each mean of a quantized tensor that training leaves float (a layer norm's mean) as a sum divided by
    the count, in place; returns their op names.

    TFLite's converter gives a MEAN of an int8 tensor without a range of its own the input's scale and runs it in
    int8, which rounds the mean onto the input's grid (and a layer norm multiplies that rounding by its 1 / sigma);
    a SUM and a DIV it leaves float, as the trained graph computes them. A mean that training quantizes (a pooled
    input of a weight layer) has a FakeQuant after it and stays an int8 MEAN.
    """
    kept = []
    for op in graph.get_operations():
        if op.type != "Mean" or match.is_untouchable(op) or not op.outputs[0].dtype.is_floating:
            continue
        data, axes = op.inputs
        if match.grid_source(data).op.type not in _FAKE_QUANT_TYPES:
            continue
        readers = op.outputs[0].consumers()
        if not readers or any(reader.type in _FAKE_QUANT_TYPES for reader in readers):
            continue
        try:
            axes = np.atleast_1d(tf.get_static_value(axes))
        except (TypeError, ValueError):
            continue
        if data.shape.rank is None or axes.dtype.kind not in "iu" or any(
                data.shape[int(a)] is None for a in axes):
            continue
        count = int(np.prod([data.shape[int(a)] for a in axes]))
        with graph.name_scope(None), graph.name_scope(op.name + "/as_sum"):
            total = tf.reduce_sum(data, [int(a) for a in axes], keepdims=op.get_attr("keep_dims"))
            mean = tf.math.truediv(total, np.float32(count), name="mean")
        rewrite.reroute_consumers(op.outputs[0], mean, list(readers))
        kept.append(op.name)
    return kept


def _sums_as_adds(graph_def):
    """Make each AddN of two tensors (a Keras 3 Add layer) an AddV2, in place: the same float sum, which TFLite runs
    as an int8 ADD of its two quantized inputs onto the sum's range. TFLite has no int8 ADD_N: its converter runs
    an AddN in float after requantizing both inputs onto the sum's grid, which rounds them where the trained graph
    adds them as they are."""
    for node in graph_def.node:
        if node.op == "AddN" and len([name for name in node.input if not name.startswith("^")]) == 2:
            node.op = "AddV2"
            del node.attr["N"]


def packed_steps(tensors):
    """{weight variable: float32 step per range group, alpha * float32(1/(2^k-1))} of a packed file's quantized
    tensors (packed_reader.read_packed_model): the step the evaluation graph puts a symmetric-grid bias on."""
    return {t.name: np.multiply(t.alpha, np.float32(1.0 / ((1 << t.bits) - 1)), dtype=np.float32)
            for t in tensors if hasattr(t, "alpha")}


def build(build_forward, weights, report, input_shape, calibration_images, batch_size=100, weight_steps=None):
    """Freeze the model with FakeQuant ops carrying the trained ranges (see the module docstring).

    Args:
      build_forward: images -> logits, the model's evaluation forward pass.
      weights: load_packed_weights output (quantized weights dequantized, activation ranges stored).
      report: the QuantReport of the checkpoint (bits <= 8 everywhere; see check_int8_compatible).
      input_shape: [None, H, W, C].
      calibration_images: float32 [N, H, W, C] for the tensors without a trained range (None when a run
        trained with quantize_layer_outputs left none).
      batch_size: images per calibration run.
      weight_steps: packed_steps of the packed file the weights come from (the biases' int32 grid then uses
        the trained steps bit for bit); None recomputes them from the dequantized weights.
    Returns:
      a FakeQuantGraph.
    Raises:
      ValueError: a quantized layer uses more than 8 bits (named in the message).
      ExportError: the weights do not fit the model, or no calibration image was given.
    """
    report = load_report(report)
    tflite_export.check_int8_compatible(report)
    images_value = None if calibration_images is None else np.asarray(calibration_images, np.float32)
    if images_value is not None and (images_value.ndim < 2 or len(images_value) == 0):
        raise model_export.ExportError("calibration images must be [N, H, W, C] with N >= 1, got shape %s"
                                       % (images_value.shape,))
    weight_layers = {layer.name: layer for layer in report.weight_layers}
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, list(input_shape), name=inference_graph.INPUT_NAME)
        logits = build_forward(images)
        folded_outputs = {}
        if report.config.get("fold_batch_norms"):
            folded_outputs = fold.fold_batch_norms(graph, is_training=False, weights_folded=True).outputs
        candidates = [c for c in match.find_weight_candidates(graph) if c.input_index is not None
                      and not c.skip_reason]
        activations = match.find_activations(graph)
        output = frozen_graph.named_output(graph, logits)
        assigns, feeds = frozen_graph.variable_assignments(weights, keep_unused_ranges=True)
        # Resolved before the weights are rerouted through their FakeQuants (a model input is found
        # as the operand of its layer that is not the weight variable).
        trained = [(layer, match.integer_tensor(graph, layer.name, folded_outputs))
                   for layer in report.activation_layers
                   if layer.quantized and report.config.get("act_range") == "ema"
                   and len(layer.range_variables or ()) == 2]
        # A trained input range read through Identity / reshape ops (a SavedModel's function inputs) goes on the
        # input itself: calibrating the input as well would quantize it twice, on two grids.
        trained = [(layer, images if match.grid_source(tensor).name == images.name else tensor)
                   for layer, tensor in trained]
        ranged = {tensor.op.name for _, tensor in trained}
        ranged_tensors = {tensor.name for _, tensor in trained}
        # What needs a range is what training quantizes with quantize_layer_outputs (one definition):
        # the image input, activations, and match.find_integer_tensors.
        targets = [images] + [op.outputs[0] for op in activations if op.name not in ranged]
        targets += [item.tensor for item in match.find_integer_tensors(graph, candidates, ranged, folded_outputs)]
        # A tensor that only reshapes (or passes on) a trained one is on its grid already.
        targets = [t for i, t in enumerate(targets)
                   if match.grid_source(t).name not in ranged_tensors and all(t is not u for u in targets[:i])]
        weight_records, replaced = [], {}
        original_weights = [(c, c.op.inputs[c.input_index]) for c in candidates]
        for c in candidates:
            record, moved = _weight_fake_quant(c.op, c.input_index, np.asarray(weights[c.variable_name]),
                                               weight_layers.get(c.op.name),
                                               weight_grids.for_layer(weight_layers.get(c.op.name), report.config))
            weight_records.append(record)
            replaced.update(moved)
        # A range found on a MatMul's output belongs to the convolution that now computes it.
        trained = [(layer, replaced.get(tensor.name, tensor)) for layer, tensor in trained]
        targets = [replaced.get(tensor.name, tensor) for tensor in targets]
        records, input_steps = [], {}
        for layer, tensor in trained:
            low, high = (weights[name] for name in layer.range_variables)
            quantized = _insert_range(tensor, low, high, layer.bits, "trained", records, exact_grid=True)
            # The step the evaluation graph gives the range (float32, from the stored [min, max]).
            input_steps[quantized.name] = ops.zero_exact_step(layer.bits, tf.constant(low, tf.float32),
                                                              tf.constant(high, tf.float32))
        biases_on_grid = []
        if report.config.get("quantize_layer_outputs"):
            biases_on_grid = _quantize_biases(graph, original_weights, weight_layers, report.config, replaced,
                                              input_steps, weight_steps)
    if targets and images_value is None:
        raise model_export.ExportError(
            "%d tensors have no trained range (%s); expected calibration images for them (or a run trained "
            "with --uql_quantize_layer_outputs)" % (len(targets), ", ".join(t.op.name for t in targets[:3])))
    config = tf1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    with tf1.Session(graph=graph, config=config) as sess:
        sess.run(assigns, feed_dict=feeds)
        lows = [np.inf] * len(targets)
        highs = [-np.inf] * len(targets)
        for start in range(0, len(images_value) if targets else 0, batch_size):
            values = sess.run(targets, {images: images_value[start:start + batch_size]})
            lows = [min(lo, float(v.min())) for lo, v in zip(lows, values)]
            highs = [max(hi, float(v.max())) for hi, v in zip(highs, values)]
        with graph.as_default():
            for tensor, low, high in zip(targets, lows, highs):
                _insert_range(tensor, low, high, INT8_BITS, "calibrated", records)
            float_means = _means_kept_float(graph)
        graph_def = tf1.graph_util.convert_variables_to_constants(
            sess, graph.as_graph_def(), [output.op.name])
    _sums_as_adds(graph_def)
    input_record = next(r for r in records if r["tensor"] == inference_graph.INPUT_NAME)
    input_range = tuple(input_record.get("fake_quant_range", (input_record["min"], input_record["max"])))
    return FakeQuantGraph(graph_def, weight_records, records, input_range,
                          int(len(images_value)) if targets else 0, biases_on_grid, float_means)

