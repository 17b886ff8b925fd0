"""quantize_graph: find candidates, decide bits per layer, insert quantization, report what was done."""
import numpy as np
import tensorflow as tf

from tfquant import fold, match, ops, ranges, rewrite
from tfquant.config import FLOAT_BITS, match_override
from tfquant.report import QUANTIZED, SKIPPED, LayerReport, QuantReport, VariableRecord, weight_layer_storage

REWRITTEN_COLLECTION = "tfquant_rewritten"
# Learned weight step sizes live in the scope <weight variable name><WEIGHT_RANGE_SUFFIX>.
WEIGHT_RANGE_SUFFIX = "_quant"


def _weight_bits(candidates, config):
    """(bits, reason) for every quantizable weight candidate, in data-flow order, and unused overrides."""
    eligible = [c for c in candidates if not c.skip_reason]
    if config.layer_bits is not None and len(config.layer_bits) != len(eligible):
        raise ValueError("layer_bits has %d entries but the graph has %d matmul-like layers with weight "
                         "variables (%s); expected one bit width per layer in data-flow order"
                         % (len(config.layer_bits), len(eligible),
                            ", ".join(c.variable_name for c in eligible)))
    used = set()
    decisions = {}
    for position, candidate in enumerate(eligible):
        reason = ""
        explicit = config.explicit_bits_of(candidate.op.name)
        if explicit is not None:
            bits, source = explicit, "explicit_bits"
        elif config.layer_bits is not None:
            bits, source = config.layer_bits[position], "layer_bits[%d]" % position
        else:
            bits, pattern = match_override(config.weight_overrides, candidate.variable_name)
            source = "override %r" % pattern
            if bits is not None:
                used.add(pattern)
            elif not config.quantize_all_layers and position in (0, len(eligible) - 1):
                bits = FLOAT_BITS
                reason = "%s layer kept float (quantize_all_layers=False)" % (
                    "first" if position == 0 else "last")
            else:
                bits, source = config.weight_bits, "weight_bits"
        if bits == FLOAT_BITS and not reason:
            reason = "bits 32 (%s)" % source
        decisions[candidate.op.name] = (bits, reason)
    unused = [regex.pattern for regex, _ in config.weight_overrides if regex.pattern not in used]
    if config.layer_bits is not None:
        unused = []  # an explicit list decides every layer; overrides are not consulted
    return decisions, unused


def _layout(config, candidate):
    if not config.use_buckets:
        return ops.GroupLayout()
    if config.bucket_type == "channel":
        return ops.GroupLayout("channel", channel_axes=candidate.channel_axes)
    return ops.GroupLayout("split", bucket_size=config.bucket_size)


def _quantize_weights(graph, candidates, config, is_training):
    """Rewrite every weight candidate; returns its LayerReports, the names of weight variables and of
    their learned step sizes (both counted as weight storage), and unused overrides."""
    decisions, unused = _weight_bits(candidates, config)
    layers, stored, quantized, range_variables = [], {}, {}, set()
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
            stored.setdefault(candidate.variable_name, (FLOAT_BITS, None))
            continue
        bits, reason = decisions[op.name]
        layout = _layout(config, candidate)
        layer.bits = bits
        if bits != FLOAT_BITS:
            layer.bucket_type = config.weight_bucket_type
            layer.bucket_size = config.bucket_size if layout.kind == "split" else None
            layer.channel_axes = list(layout.channel_axes) if layout.kind == "channel" else None
            layer.num_groups = layout.num_groups(layer.shape)
        previous = stored.get(candidate.variable_name)
        if previous is not None:
            if previous != (bits, layout):
                raise ValueError("weight variable %s is read by several layers with different quantization "
                                 "(%s and %s); expected one setting per variable"
                                 % (candidate.variable_name, previous, (bits, layout)))
            layer.reason = (reason + "; " if reason else "") + "storage counted at its first layer"
        else:
            stored[candidate.variable_name] = (bits, layout)
            layer.weight_storage_bits, layer.bucket_storage_bits = weight_layer_storage(
                layer.num_params, bits, layer.num_groups)
        if bits == FLOAT_BITS:
            layer.reason = reason
            continue
        key = (weight.name, bits, layout)
        if key not in quantized:
            with graph.name_scope(None), graph.name_scope(op.name + "/weight_quant"):
                if config.weight_range == "lsq":
                    quantized[key] = ranges.quantize_weight_lsq(
                        weight, bits, layout, candidate.variable_name + WEIGHT_RANGE_SUFFIX, is_training)
                elif config.weight_scheme == "symmetric":
                    quantized[key] = (ops.quantize_weight_symmetric(weight, bits, layout), None)
                else:
                    quantized[key] = (ops.quantize_weight(weight, bits, layout), None)
        tensor, learned = quantized[key]
        if learned is not None:
            # The step sizes are this layer's range storage (alpha, beta per group in the packed file).
            layer.range_variables = [v.op.name for v in learned.variables]
            range_variables.update(layer.range_variables)
        rewrite.reroute_input(op, candidate.input_index, tensor)
        layer.status = QUANTIZED
    return layers, set(stored) | range_variables, unused


def _quantize_activations(activations, config, is_training):
    """Rewrite every activation op; returns its LayerReports and unused overrides."""
    layers, used = [], set()
    for op in activations:
        layer = LayerReport(name=op.name, op_type=op.type, kind="activation", status=SKIPPED)
        layers.append(layer)
        bits, source = config.explicit_bits_of(op.name), "explicit_bits"
        if bits is None:
            bits, pattern = match_override(config.activation_overrides, op.name)
            if bits is not None:
                used.add(pattern)
                source = "override %r" % pattern
            else:
                bits, source = config.activation_bits, "activation_bits"
        layer.bits = bits
        output = op.outputs[0]
        if bits == FLOAT_BITS:
            layer.reason = "bits 32 (%s)" % source
            continue
        if not any(not match.is_untouchable(c) for c in output.consumers()):
            layer.reason = "output has no consumers"
            continue
        scope = "%s/%s" % (op.name, ranges.RANGE_SCOPE_SUFFIX)

        def build(x, bits=bits, scope=scope, op_type=op.type):
            return ranges.quantize_activation(x, bits, config.act_range, is_training,
                                              config.act_ema_decay, scope, op_type, config.pact_decay)

        _, tracker, _ = rewrite.insert_after(output, build, scope)
        layer.status = QUANTIZED
        layer.num_groups = 1
        if tracker is not None:
            layer.range_variables = [v.op.name for v in tracker.variables]
    unused = [regex.pattern for regex, _ in config.activation_overrides if regex.pattern not in used]
    return layers, unused


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
    depths = match.data_flow_depths(graph)
    candidates = match.find_weight_candidates(graph, depths)
    activations = match.find_activations(graph, depths)
    fold_notes = []
    if config.fold_batch_norms:
        # Before weight quantization, which then quantizes the folded weight each op now reads.
        fold_notes = fold.fold_batch_norms(graph, is_training, config.freeze_bn_delay).notes
    with graph.as_default():
        weight_layers, weight_vars, unused_weight = _quantize_weights(graph, candidates, config, is_training)
        act_layers, unused_act = _quantize_activations(activations, config, is_training)
        graph.add_to_collection(REWRITTEN_COLLECTION, "train" if is_training else "eval")
    notes = list(fold_notes)
    if not candidates and not activations:
        notes.append("no quantizable op found: nothing was quantized")
    notes.extend("weight override %r matched no layer" % p for p in unused_weight)
    notes.extend("activation override %r matched no activation" % p for p in unused_act)
    present = {c.op.name for c in candidates} | {op.name for op in activations}
    notes.extend("explicit_bits names %r, which is not a candidate op of this graph" % name
                 for name, _ in config.explicit_bits or () if name not in present)
    return QuantReport(weight_layers + act_layers, _other_variables(graph, weight_vars), config.to_dict(),
                       is_training, notes)
