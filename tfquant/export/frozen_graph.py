"""The frozen inference graph of an exported model: the model's forward pass with every variable a constant
(quantized weights already dequantized from the packed file), the activations the run quantized quantized with
their stored ranges, batch norms folded as trained, and biases on the int32 grid of symmetric-grid runs.
"""
import dataclasses

import numpy as np
import tensorflow as tf

import tfquant
from tfquant import fold, match, quantize, ranges, weight_grids
from tfquant.config import FLOAT_BITS
from tfquant.export.inference_graph import INPUT_NAME, OUTPUT_NAME
from tfquant.export.model_export import COUNTER_SUFFIXES, ExportError, resolve_checkpoint
from tfquant.report import QuantReport, config_from_report, layer_layout

tf1 = tf.compat.v1


def activation_config(decisions):
    """The QuantConfig whose activation decisions a frozen graph replays.

    Args:
      decisions: a QuantReport (its recorded per-activation bits, no pattern from it is run), a
        QuantConfig, a dict of QuantConfig arguments given by the caller, or None (no activation
        quantization).
    Returns:
      a QuantConfig that leaves every weight float, or None when no activation is quantized.
    """
    if decisions is None:
        return None
    if isinstance(decisions, QuantReport):
        config = config_from_report(decisions)
    elif isinstance(decisions, tfquant.QuantConfig):
        config = decisions
    else:
        try:
            config = tfquant.QuantConfig(**decisions)
        except (TypeError, ValueError) as exc:
            raise ExportError("config is not valid: %s" % " ".join(str(exc).split())) from None
    activation_bits = [setting.bits for _, setting in config.activation_overrides] + [config.activation_bits]
    activation_bits += [bits for _, bits in config.explicit_bits or ()]
    if all(bits == FLOAT_BITS for bits in activation_bits):
        return None
    # Weights are already dequantized in the frozen graph; only activations are rewritten.
    explicit = None if config.explicit_bits is None else dict(config.explicit_bits)
    # Folded batch norms are already in the weights and handled by the caller.
    return dataclasses.replace(config, weight_bits=FLOAT_BITS, layer_bits=None, weight_overrides=(),
                               explicit_bits=explicit, fold_batch_norms=False)


def _without_weight_decisions(config, graph):
    """`config` with explicit bits for the graph's weight ops removed, so weights stay float."""
    if config.explicit_bits is None:
        return config
    weight_ops = {candidate.op.name for candidate in match.find_weight_candidates(graph)}
    return dataclasses.replace(config, explicit_bits={name: bits for name, bits in config.explicit_bits
                                                      if name not in weight_ops})


def _grid_weight_steps(graph, report):
    """{op name: step} of the report's quantized weight layers whose grid an integer kernel holds, from the
    weights in `graph` (decoded from the packed file: on the grid already, so the step is recomputed from them)."""
    steps = {}
    for layer in report.weight_layers:
        layout = layer_layout(layer) if layer.quantized else None
        grid = weight_grids.for_layer(layer, report.config)
        if layout is None or not grid.has_integer_step(layout):
            continue
        op = graph.get_operation_by_name(layer.name)
        with graph.name_scope(None), graph.name_scope(layer.name + "/weight_step"):
            steps[layer.name] = grid.integer_step(op.inputs[layer.input_index], layer.bits, layout)
    return steps


def _folds_batch_norms(decisions):
    """Whether the model of `decisions` (report, config or config dict) was trained with folded batch norms."""
    if isinstance(decisions, QuantReport):
        return bool(decisions.config.get("fold_batch_norms"))
    if isinstance(decisions, tfquant.QuantConfig):
        return decisions.fold_batch_norms
    return bool(decisions and decisions.get("fold_batch_norms"))


def folded_weight_values(build_forward, checkpoint, input_shape):
    """W * gamma / sigma of every batch-norm-folded weight, computed by the training graph's folding ops.

    Args:
      build_forward: images -> logits, the model's evaluation forward pass.
      checkpoint: checkpoint prefix (or directory) holding the weights and batch-norm state.
      input_shape: [None, H, W, C].
    Returns:
      {weight variable name: float32 folded weight} for every folded layer.
    Raises:
      ExportError: the checkpoint cannot be read or lacks a variable of the model.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    graph = tf.Graph()
    with graph.as_default():
        build_forward(tf1.placeholder(tf.float32, list(input_shape)))
        names = {c.op.name: c.variable_name for c in match.find_weight_candidates(graph) if c.variable_name}
        folded = fold.fold_batch_norms(graph, is_training=False).folded
        fetches = {names[layer.op.name]: layer.op.inputs[1] for layer in folded if layer.op.name in names}
        saver = tf1.train.Saver(tf1.global_variables())
    config = tf1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    with tf1.Session(graph=graph, config=config) as sess:
        try:
            saver.restore(sess, checkpoint)
        except (tf.errors.OpError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError("checkpoint %s cannot be restored into the model (%s)" % (checkpoint, first)) from None
        return sess.run(fetches)


def variable_assignments(weights, keep_unused_ranges=False):
    """Assign ops (and their feeds) giving every variable of the default graph its exported value.

    Args:
      weights: dict variable name -> array (load_packed_weights output).
      keep_unused_ranges: stored activation ranges the graph does not use are expected (activations
        left float, or quantized by other ops).
    Returns:
      (list of assign ops, feed dict).
    Raises:
      ExportError: a model variable is missing or has another shape, or `weights` holds variables
        the model does not define.
    """
    assigns, feeds, used = [], {}, set()
    for variable in tf1.global_variables():
        name = variable.op.name
        shape = variable.shape.as_list()
        if name.endswith(COUNTER_SUFFIXES) and name not in weights:
            value = np.ones(shape, variable.dtype.as_numpy_dtype)
        elif name not in weights:
            raise ExportError("the model variable %s (shape %s) is not in the exported weights"
                              % (name, shape))
        else:
            value = np.asarray(weights[name])
            if list(value.shape) != shape:
                raise ExportError("variable %s has shape %s in the exported weights but shape %s "
                                  "in the model" % (name, list(value.shape), shape))
            value = value.astype(variable.dtype.as_numpy_dtype, copy=False)
            used.add(name)
        placeholder = tf1.placeholder(variable.dtype.base_dtype, shape)
        assigns.append(variable.assign(placeholder))
        feeds[placeholder] = value
    range_marker = "/%s/" % ranges.RANGE_SCOPE_SUFFIX
    # Stored activation ranges are expected to go unused when activations stay float.
    unused = sorted(name for name in set(weights) - used
                    if not keep_unused_ranges or range_marker not in name)
    if unused:
        raise ExportError("the exported weights hold %d variable(s) the model does not define, e.g. %s; "
                          "expected weights of this model" % (len(unused), unused[0]))
    return assigns, feeds


def named_output(graph, logits):
    """`logits` under the name OUTPUT_NAME: itself when a saved inference graph already named it, else an Identity.

    Args:
      graph: the graph of `logits` (the Identity is made outside any name scope).
      logits: the forward pass's output tensor.
    Returns:
      the output tensor; callers check that its op is named OUTPUT_NAME (another op may hold the name).
    """
    if logits.op.name == OUTPUT_NAME and logits.op.type == "Identity":
        return logits  # tfquant.export.inference_graph names its own output
    with graph.name_scope(None):
        return tf.identity(logits, name=OUTPUT_NAME)


def freeze_inference_graph(build_forward, weights, decisions=None, input_shape=None,
                           quantize_activations=True):
    """A self-contained inference GraphDef: weights as constants, input 'input', output 'logits'.

    Args:
      build_forward: images -> logits; builds the model's evaluation forward pass (creating its
        variables with tf.compat.v1.get_variable) in the current graph.
      weights: dict variable name -> array (load_packed_weights output); quantized weights are
        already dequantized, so the result holds no weight quantization op.
      decisions: the QuantReport (or a QuantConfig / dict of config arguments, see
        activation_config); activations it quantizes are quantized in the result too, with the
        stored moving-average ranges.
      input_shape: [None, H, W, C] of the 'input' placeholder.
      quantize_activations: False leaves activations float even if the config quantizes them
        (the graph TFLite int8 conversion calibrates itself).  Activation ranges' `ema_steps` and
        `init_steps` counters, which the packed file does not store, are set to 1 so the stored moving-average
        ranges are used (pack_checkpoint lists ranges training never recorded in its metadata).
    Returns:
      a tf.compat.v1.GraphDef.
    Raises:
      ExportError: a model variable is missing from `weights` or has another shape.
    """
    if input_shape is None:
        raise ExportError("input_shape is required, e.g. [None, 28, 28, 1]")
    act_config = activation_config(decisions) if quantize_activations else None
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, list(input_shape), name=INPUT_NAME)
        logits = build_forward(images)
        if _folds_batch_norms(decisions):
            fold.fold_batch_norms(graph, is_training=False, weights_folded=True)
        if act_config is not None:
            rewritten = tfquant.quantize_graph(graph, _without_weight_decisions(act_config, graph), is_training=False)
            logits = rewritten.output(logits)
            if isinstance(decisions, QuantReport):
                # As the evaluation graph: biases on the int32 grid of the decoded weights' steps (the layers whose
                # grid an integer kernel holds).
                quantize.quantize_biases(graph, _grid_weight_steps(graph, decisions), rewritten.integer_steps)
        output = named_output(graph, logits)
        if output.op.name != OUTPUT_NAME or images.op.name != INPUT_NAME:
            raise ExportError("the forward pass already defines an op named %r or %r; rename it so "
                              "the exported graph's input and output keep their names"
                              % (INPUT_NAME, OUTPUT_NAME))
        assigns, feeds = variable_assignments(weights, keep_unused_ranges=not quantize_activations)
    config = tf1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    with tf1.Session(graph=graph, config=config) as sess:
        sess.run(assigns, feed_dict=feeds)
        frozen = tf1.graph_util.convert_variables_to_constants(
            sess, graph.as_graph_def(), [OUTPUT_NAME])
    return frozen


def run_graph_def(graph_def, images, batch_size=256):
    """Run a frozen inference graph on images.

    Args:
      graph_def: a GraphDef with 'input' and 'logits' (freeze_inference_graph output).
      images: float32 array [N, H, W, C].
      batch_size: images per session run.
    Returns:
      float32 logits [N, classes].
    """
    graph = tf.Graph()
    with graph.as_default():
        tf1.import_graph_def(graph_def, name="")
    images = np.asarray(images, dtype=np.float32)
    config = tf1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    outputs = []
    with tf1.Session(graph=graph, config=config) as sess:
        for start in range(0, len(images), batch_size):
            outputs.append(sess.run(OUTPUT_NAME + ":0",
                                    feed_dict={INPUT_NAME + ":0": images[start:start + batch_size]}))
    return np.concatenate(outputs, axis=0)
