"""quantize_graph: find candidates, decide bits per layer, insert quantization, report what was done."""
import numpy as np
import tensorflow as tf

from tfquant import fold, kernels, match, ops, policy, ranges, recompute, rewrite, weight_grids
from tfquant.config import FLOAT_BITS
from tfquant.report import QUANTIZED, SKIPPED, LayerReport, QuantReport, VariableRecord, weight_layer_storage

REWRITTEN_COLLECTION = "tfquant_rewritten"
# Learned weight step sizes live in the scope <weight variable name><WEIGHT_RANGE_SUFFIX>.
WEIGHT_RANGE_SUFFIX = "_quant"


def _quantize_weights(graph, candidates, plan, config, is_training):
    """Rewrite every weight candidate the plan quantizes.

    Returns:
      (its LayerReports, the names of the weight variables and of their learned step sizes: both are
      counted as weight storage, {op name: weight step} of the layers whose grid an integer kernel holds).
    """
    layers, stored, quantized, range_variables, steps = [], {}, {}, set(), {}
    for candidate in candidates:
        op = candidate.op
        layer = LayerReport(name=op.name, op_type=op.type, kind="weight", status=SKIPPED,
                            reason=candidate.skip_reason, weight_variable=candidate.variable_name,
                            input_index=candidate.input_index)
        layers.append(layer)
        if candidate.input_index is None:
            continue
        weight = candidate.weight
        if weight.shape.is_fully_defined():
            layer.shape = weight.shape.as_list()
            layer.num_params = int(np.prod(layer.shape, dtype=np.int64))
        if candidate.skip_reason:
            layer.weight_storage_bits, layer.bucket_storage_bits = weight_layer_storage(
                layer.num_params, FLOAT_BITS, 0)
            stored.setdefault(candidate.variable_name, (FLOAT_BITS, None, None))
            continue
        decision = plan.decision(op.name)
        bits, reason = decision.bits, decision.reason
        layout = config.layer_layout(candidate.channel_axes, decision.setting)
        grid = weight_grids.GRIDS[decision.grid]()
        layer.bits = bits
        if bits != FLOAT_BITS:
            layer.weight_grid = grid.name
            layer.setting_source = None if decision.setting_source == "config" else decision.setting_source
            layer.bucket_type = layout.bucket_type
            layer.bucket_size = layout.bucket_size if layout.kind in ("split", "block") else None
            layer.channel_axes = list(layout.channel_axes) if layout.kind in ("channel", "block") else None
            layer.num_groups = layout.num_groups(layer.shape)
        previous = stored.get(candidate.variable_name)
        if previous is not None:
            if previous != (bits, layout, grid.name):
                raise ValueError("weight variable %s is read by several layers with different quantization "
                                 "(%s and %s); expected one setting per variable"
                                 % (candidate.variable_name, previous, (bits, layout, grid.name)))
            layer.reason = (reason + "; " if reason else "") + "storage counted at its first layer"
        else:
            stored[candidate.variable_name] = (bits, layout, grid.name)
            layer.weight_storage_bits, layer.bucket_storage_bits = weight_layer_storage(
                layer.num_params, grid.storage_bits(bits), layer.num_groups)
        if bits == FLOAT_BITS:
            layer.reason = reason
            continue
        key = (weight.name, bits, layout, grid.name)
        if key not in quantized:
            with graph.name_scope(None), graph.name_scope(op.name + "/weight_quant"):
                quantized[key] = grid.quantize(weight, bits, layout, candidate.variable_name + WEIGHT_RANGE_SUFFIX,
                                               is_training)
        tensor, learned = quantized[key]
        if not is_training and grid.has_integer_step(layout):
            with graph.name_scope(None), graph.name_scope(op.name + "/weight_step"):
                steps[op.name] = grid.integer_step(weight, bits, layout)
        if learned is not None:
            # The step sizes are this layer's range storage (alpha, beta per group in the packed file).
            layer.range_variables = [v.op.name for v in learned.variables]
            range_variables.update(layer.range_variables)
        rewrite.reroute_input(op, candidate.input_index, tensor)
        layer.status = QUANTIZED
    return layers, set(stored) | range_variables, steps


def _quantize_activations(items, plan, config, is_training):
    """Rewrite every activation (or other IntegerTensor) the plan quantizes.

    IntegerTensors nothing reads yet (a model's logits before its loss is built) are quantized all the same;
    activations nothing reads are skipped.
    Returns:
      (their LayerReports, {tensor name: quantized tensor} of the quantized tensors nothing read,
      {quantized tensor name: step} of those on the integer runtimes' grid in evaluation graphs,
      {tensor name: quantized tensor} of every IntegerTensor quantized).
    """
    layers, unread, steps, outputs = [], {}, {}, {}
    for item in items:
        layer = LayerReport(name=item.name, op_type=item.op_type, kind="activation", status=SKIPPED)
        layers.append(layer)
        decision = plan.decision(item.name)
        bits = layer.bits = decision.bits
        output = item.tensor
        if bits == FLOAT_BITS:
            layer.reason = decision.reason
            continue
        has_readers = any(not match.is_untouchable(c) for c in output.consumers())
        if not has_readers and item.op_type in match.ACTIVATION_OP_TYPES:
            layer.reason = "output has no consumers"
            continue
        scope = "%s/%s" % (item.name.replace(":", "/"), ranges.RANGE_SCOPE_SUFFIX)

        def build(x, bits=bits, scope=scope, op_type=item.op_type):
            return ranges.quantize_activation(x, bits, config.act_range, is_training,
                                              config.act_ema_decay, scope, op_type, config.pact_decay,
                                              zero_exact=config.quantize_layer_outputs)

        readers = sum(1 for c in output.consumers() if not match.is_untouchable(c) for t in c.inputs if t is output)
        quantized, tracker, rerouted = rewrite.insert_after(output, build, scope)
        if not has_readers:
            unread[output.name] = quantized
        if item.op_type not in match.ACTIVATION_OP_TYPES:
            outputs[output.name] = quantized
        if rerouted != readers:
            # As tf.contrib.quantize checks: a reader left on the float output would silently skip quantization.
            raise RuntimeError("quantizing activation %s moved %d of its %d readers onto the quantized output"
                               % (item.name, rerouted, readers))
        layer.status = QUANTIZED
        layer.num_groups = 1
        if tracker is not None:
            layer.range_variables = [v.op.name for v in tracker.variables]
            if getattr(tracker, "step", None) is not None:
                steps[quantized.name] = tracker.step
    return layers, unread, steps, outputs


def quantize_biases(graph, weight_steps, input_steps):
    """Put the bias each symmetric-grid layer adds on the int32 grid an int8 kernel adds (evaluation graphs).

    Args:
      graph: the graph, its activations quantized.
      weight_steps: {weight op name: its weight's step (scalar or per output channel)}.
      input_steps: {quantized tensor name: step} (QuantReport.integer_steps).

    An int8 runtime stores a layer's bias as int32 codes of the input's step times the weight's; adding the
    float bias instead moves an output across a rounding boundary here and there, and such differences grow
    layer by layer. Layers whose input is not on the integer grid (a float input, PACT/LSQ ranges) are
    left alone.
    """
    for op_name, weight_step in weight_steps.items():
        op = graph.get_operation_by_name(op_name)
        input_step = input_steps.get(match.grid_source(op.inputs[match.data_operand_index(op)]).name)
        bias_add = match.bias_reader(op.outputs[0])
        if input_step is None or bias_add is None:
            continue
        index = 1 if bias_add.inputs[0] is op.outputs[0] else 0
        with graph.name_scope(None), graph.name_scope(op.name + "/bias_quant"):
            rewrite.reroute_input(bias_add, index, ops.quantize_bias(bias_add.inputs[index], input_step * weight_step))


def _layer_outputs(graph, candidates, plan, config, folded_outputs):
    """The IntegerTensors quantize_layer_outputs adds, with the plan extended by their bit decisions."""
    covered = {d.op_name for d in plan.decisions if d.kind == policy.ACTIVATION and d.bits != FLOAT_BITS}
    items = match.find_integer_tensors(graph, [c for c in candidates if not c.skip_reason], covered,
                                       folded_outputs)
    decisions, unused = policy.decide_activation_bits([item.name for item in items], config)
    unused_by_both = [p for p in plan.unused_activation_overrides if p in unused]
    return items, policy.BitPlan(plan.decisions + decisions, plan.unused_weight_overrides, unused_by_both)


def _other_variables(graph, weight_variables):
    """Float variables stored besides the matmul-like weights, e.g. biases and batch-norm state."""
    records = []
    for variable in graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES):
        name = variable.op.name
        if name in weight_variables or not variable.dtype.base_dtype.is_floating:
            continue
        records.append(VariableRecord(name=name, shape=variable.shape.as_list()))
    return records


def quantize_graph(graph, config, is_training=True):
    """Rewrite `graph` in place so weights and activations pass through uniform quantization.

    Call it after the model's forward pass (and loss) are built and before gradients or an optimizer
    are created, so that training differentiates through the quantized forward pass.

    Args:
      graph: a tf.Graph built in tf.compat.v1 graph mode.
      config: a QuantConfig.
      is_training: training graphs use batch activation ranges and update their moving averages;
        evaluation graphs use the moving averages (with config.act_range == 'ema'). Learned ranges
        (config.act_range 'pact'/'lsq', config.weight_range 'lsq') are trainable variables in both;
        a training graph stores their first-batch initial values. PACT's decay terms are added to
        GraphKeys.REGULARIZATION_LOSSES: add tf.compat.v1.losses.get_regularization_loss() to the loss.
        With config.fold_batch_norms, batch norms are folded first (tfquant.fold) so the weight that is
        quantized is W * gamma / sigma; layers it cannot fold are named in the report's notes.
    Returns:
      a QuantReport of every candidate op.
    """
    if graph.get_collection(REWRITTEN_COLLECTION):
        raise RuntimeError("graph was already rewritten by tfquant.quantize_graph; rewriting it again would "
                           "quantize twice. Build a fresh graph to quantize with other settings.")
    # find
    depths = match.data_flow_depths(graph)
    candidates = match.find_weight_candidates(graph, depths)
    activations = match.find_activations(graph, depths)
    # decide
    plan = policy.decide_bits([policy.WeightLayer(c.op.name, c.variable_name) for c in candidates
                               if not c.skip_reason], [op.name for op in activations], config)
    # rewrite
    folding = None
    if config.fold_batch_norms:
        # Before weight quantization, which then quantizes the folded weight each op now reads.
        folding = fold.fold_batch_norms(graph, is_training, config.freeze_bn_delay)
    fold_notes, folded_outputs = (folding.notes, folding.outputs) if folding is not None else ([], {})
    items = [match.IntegerTensor(op.name, op.outputs[0], op.type) for op in activations]
    if config.quantize_layer_outputs:
        # After folding (the outputs are the folded layers'), before any quantizer is inserted.
        extra, plan = _layer_outputs(graph, candidates, plan, config, folded_outputs)
        items += extra
    with graph.as_default():
        weight_layers, weight_vars, weight_steps = _quantize_weights(graph, candidates, plan, config, is_training)
        if folding is not None:
            fold.rescale_weights(folding)
        act_layers, unread, input_steps, layer_outputs = _quantize_activations(items, plan, config, is_training)
        quantize_biases(graph, weight_steps, input_steps)
        if is_training and config.recompute_quantized != "none":
            # Quantized tensors rebuilt in the backward pass rather than kept: less memory, more work per step.
            recompute.recompute_in_backward(graph, activations=config.recompute_quantized == "all")
        graph.add_to_collection(REWRITTEN_COLLECTION, "train" if is_training else "eval")
    # report
    notes = list(fold_notes)
    if not candidates and not activations:
        notes.append("no quantizable op found: nothing was quantized")
    notes.extend("weight override %r matched no layer" % p for p in plan.unused_weight_overrides)
    notes.extend("activation override %r matched no activation" % p for p in plan.unused_activation_overrides)
    present = {c.op.name for c in candidates} | {item.name for item in items}
    notes.extend("explicit_bits names %r, which is not a candidate op of this graph" % name
                 for name, _ in config.explicit_bits or () if name not in present)
    report = QuantReport(weight_layers + act_layers, _other_variables(graph, weight_vars), config.to_dict(),
                         is_training, notes)
    report.quantized_outputs = unread
    # Which path the training graph's activation quantizers run (tfquant.kernels), for the learner's log.
    quantized_activations = any(layer.quantized for layer in act_layers)
    report.activation_path = (kernels.describe(graph) if is_training and quantized_activations
                              and config.act_range in ("ema", "batch") else None)
    report.quantized_layer_outputs = layer_outputs
    report.integer_steps = input_steps
    return report
