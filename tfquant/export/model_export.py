"""Export a quantized checkpoint: the packed `.tfq` model file and a frozen inference graph.

The packed file holds, for every quantized weight of a QuantReport, the integer codes and the
per-group (alpha, beta) that the training graph used, computed by the very same TensorFlow ops
(`tfquant.weight_codes`); every other stored variable goes in as float32.  Dequantizing it
(`load_packed_weights`) gives the quantized weights bit for bit, so a frozen graph built from them
predicts exactly what the quantized checkpoint predicts.
"""
import os

import numpy as np
import tensorflow as tf

import tfquant
from tfquant import checkpoints, ops, ranges
from tfquant.config import FLOAT_BITS
from tfquant.export import packed_file
from tfquant.ops import GroupLayout
from tfquant.report import QuantReport

tf1 = tf.compat.v1

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SIZE_SLACK_RATIO = 1.02
SIZE_SLACK_BYTES = 4096
# Training-only counters of a range (ema_steps, init_steps); 0 would make the frozen graph ignore the
# stored range.
_COUNTER_SUFFIXES = tuple("/" + name for name in ranges.COUNTER_NAMES)


class ExportError(ValueError):
    """Checkpoint, report or weights do not fit together; the message is one line naming what."""


def load_report(report):
    """A QuantReport from a QuantReport, its to_dict() form or the path of its JSON file.

    Args:
      report: QuantReport, dict or path.
    Returns:
      a QuantReport.
    """
    if isinstance(report, QuantReport):
        return report
    if isinstance(report, dict):
        try:
            return QuantReport.from_dict(report)
        except ValueError as exc:
            raise ExportError("report: %s" % exc) from None
    path = os.fspath(report)
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError as exc:
        raise ExportError("report %s cannot be read (%s)" % (path, exc.strerror or exc)) from None
    try:
        return QuantReport.from_json(text)
    except ValueError as exc:
        raise ExportError("report %s: %s" % (path, " ".join(str(exc).split()))) from None


def resolve_checkpoint(checkpoint):
    """The checkpoint prefix for a prefix or a directory (its latest checkpoint).

    Paths in a `checkpoint` state file are never followed outside its directory (tfquant.checkpoints).
    Args:
      checkpoint: a checkpoint (DIR/BASENAME-N), a prefix (DIR/BASENAME: its newest checkpoint), or a
        directory holding the checkpoints of one prefix.
    Returns:
      the checkpoint prefix.
    """
    try:
        return checkpoints.resolve(checkpoint)
    except checkpoints.CheckpointError as exc:
        raise ExportError(str(exc)) from None


def _open_checkpoint(checkpoint):
    try:
        return tf.train.load_checkpoint(checkpoint)
    except (tf.errors.OpError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError("checkpoint %s cannot be read (%s)" % (checkpoint, first)) from None


def _layout(layer):
    if layer.bucket_type == "channel":
        return GroupLayout("channel", channel_axes=tuple(layer.channel_axes or ()))
    if layer.bucket_type == "split":
        return GroupLayout("split", bucket_size=layer.bucket_size)
    if layer.bucket_type is None:
        return GroupLayout()
    raise ExportError("report layer %s: bucket_type %r is not valid; expected None, 'channel' or 'split'"
                      % (layer.name, layer.bucket_type))


def _stored_variables(report):
    """[(variable name, expected shape or None, layer or None)] in storage order, one per variable.

    Quantized weights come first (data-flow order), then float weights, then other variables; a
    variable read by several layers is stored once, as the report counts it at its first layer.
    """
    quantized, floats, seen = [], [], set()
    for layer in report.weight_layers:
        if layer.input_index is None or not layer.weight_variable or layer.weight_variable in seen:
            continue
        seen.add(layer.weight_variable)
        if layer.quantized and layer.bits != FLOAT_BITS:
            quantized.append((layer.weight_variable, layer.shape, layer))
        else:
            floats.append((layer.weight_variable, layer.shape, None))
    others = [(record.name, list(record.shape), None) for record in report.other_variables
              if record.name not in seen]
    return quantized + floats + others


def _read_checked(reader, checkpoint, name, shape):
    """The checkpoint's float32 value of `name`, which must exist with `shape`."""
    shapes = reader.get_variable_to_shape_map()
    if name not in shapes:
        raise ExportError("checkpoint %s has no variable %s (the report expects shape %s)"
                          % (checkpoint, name, shape))
    found = [int(d) for d in shapes[name]]
    if shape is not None and found != [int(d) for d in shape]:
        raise ExportError("variable %s has shape %s in checkpoint %s but shape %s in the report"
                          % (name, found, checkpoint, list(shape)))
    dtype = reader.get_variable_to_dtype_map()[name]
    if not dtype.is_floating:
        raise ExportError("variable %s in checkpoint %s has dtype %s; expected a float variable"
                          % (name, checkpoint, dtype.name))
    return np.asarray(reader.get_tensor(name), dtype=np.float32)


def _learned_steps(reader, checkpoint, layer):
    """(step sizes or None, initialised) of a weight layer trained with learned (LSQ) step sizes."""
    if not layer.range_variables:
        return None
    name = layer.range_variables[0]
    step = _read_checked(reader, checkpoint, name, [layer.num_groups])
    counter = name.rpartition("/")[0] + "/" + ranges.COUNTER_NAMES[1]
    seen = counter not in reader.get_variable_to_shape_map() or int(reader.get_tensor(counter)) > 0
    return step, seen


def _compute_codes(quantized):
    """(codes, alpha, beta) of each (layer, value, learned steps) triple, by the training graph's ops."""
    if not quantized:
        return []
    graph = tf.Graph()
    with graph.as_default():
        feeds, fetches = {}, []
        for layer, value, learned in quantized:
            # A placeholder keeps the value out of grappler's constant folding, as in training.
            x = tf1.placeholder(tf.float32, value.shape)
            feeds[x] = value
            if learned is None:
                fetches.append(tfquant.weight_codes(x, layer.bits, _layout(layer)))
                continue
            step_value, seen = learned
            if seen:
                step = tf1.placeholder(tf.float32, step_value.shape)
                feeds[step] = step_value
            else:
                # A checkpoint saved before its first step: training would use the initial step sizes.
                step = ranges.lsq_weight_initial(x, layer.bits, _layout(layer))
            step = ops.positive_step(step)
            fetches.append(ops.lsq_weight_codes(x, step, layer.bits, _layout(layer)))
    config = tf1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    with tf1.Session(graph=graph, config=config) as sess:
        return sess.run(fetches, feed_dict=feeds)


def _unrecorded_ranges(reader, report):
    """Activation-range scopes that never saw a training batch (ema_steps or init_steps == 0)."""
    shapes = reader.get_variable_to_shape_map()
    scopes = []
    for layer in report.activation_layers:
        for name in layer.range_variables or ():
            scope = name.rpartition("/")[0]
            for suffix in _COUNTER_SUFFIXES:
                steps = scope + suffix
                if steps in shapes and int(reader.get_tensor(steps)) == 0 and scope not in scopes:
                    scopes.append(scope)
    return scopes


def pack_checkpoint(checkpoint, report, output_path, metadata=None):
    """Write the packed model file (.tfq) of a quantized checkpoint.

    Args:
      checkpoint: checkpoint prefix (or a directory: its latest checkpoint).
      report: the QuantReport of the quantized graph (object, dict or JSON path).
      output_path: destination file; written atomically, untouched on any error.
      metadata: optional JSON-serialisable dict stored under metadata['user'].
    Returns:
      stats dict: path, file_bytes, bound_bytes (1.02 * total_storage_bits / 8 + 4096),
      within_bound, total_storage_bits (the report's), accounted_bits (the file's tensors),
      float_storage_bits, quantized_tensors, float_tensors, compression_ratio (float32 size of the
      model over file_bytes).
    Raises:
      ExportError: the checkpoint misses a variable of the report or holds it with another shape.
    """
    report = load_report(report)
    checkpoint = resolve_checkpoint(checkpoint)
    reader = _open_checkpoint(checkpoint)
    if metadata is not None and not isinstance(metadata, dict):
        raise ExportError("metadata must be a dict, got %s" % type(metadata).__name__)

    # Everything is read and checked before anything is written, so an error leaves no file.
    stored = _stored_variables(report)
    values = {name: _read_checked(reader, checkpoint, name, shape) for name, shape, _ in stored}
    quantized = [(layer, values[name], _learned_steps(reader, checkpoint, layer))
                 for name, _, layer in stored if layer is not None]
    codes = iter(_compute_codes(quantized))
    tensors = []
    for name, _, layer in stored:
        if layer is None:
            tensors.append(packed_file.FloatTensor(name, values[name]))
            continue
        layer_codes, alpha, beta = next(codes)
        layout = _layout(layer)
        tensors.append(packed_file.QuantizedTensor(
            name, tuple(values[name].shape), layer.bits, layout.kind,
            layout.channel_axes if layout.kind == "channel" else None, layout.bucket_size,
            layer_codes, alpha, beta))

    total_bits = report.total_storage_bits
    info = {
        "format": "tfquant packed model",
        "tfquant_version": tfquant.__version__,
        "checkpoint": os.path.basename(checkpoint),
        "config": report.config,
        "total_storage_bits": total_bits,
        "float_storage_bits": report.float_storage_bits,
        "unrecorded_activation_ranges": _unrecorded_ranges(reader, report),
    }
    if metadata is not None:
        info["user"] = metadata
    file_bytes = packed_file.write_packed_model(output_path, tensors, info)
    bound = SIZE_SLACK_RATIO * total_bits / 8.0 + SIZE_SLACK_BYTES
    return {
        "path": os.fspath(output_path),
        "file_bytes": int(file_bytes),
        "bound_bytes": bound,
        "within_bound": file_bytes <= bound,
        "total_storage_bits": total_bits,
        "accounted_bits": packed_file.accounted_bits(tensors),
        "float_storage_bits": report.float_storage_bits,
        "quantized_tensors": len(quantized),
        "float_tensors": len(tensors) - len(quantized),
        "compression_ratio": report.float_storage_bits / 8.0 / file_bytes,
    }


def load_packed_weights(path):
    """Read a packed model file into float32 weights.

    Args:
      path: a .tfq file written by pack_checkpoint.
    Returns:
      (dict variable name -> float32 ndarray, quantized weights dequantized exactly as the training
      graph computes them; metadata dict).
    Raises:
      packed_file.PackedFileError: missing, truncated or corrupted file.
    """
    tensors, metadata = packed_file.read_packed_model(path)
    weights = {}
    for tensor in tensors:
        if isinstance(tensor, packed_file.QuantizedTensor):
            weights[tensor.name] = tensor.dequantize()
        else:
            weights[tensor.name] = tensor.array
    return weights, metadata


def quantizes_activations(config_dict):
    """True when a report config quantizes any activation (bits < 32 by default or by override)."""
    if config_dict.get("activation_bits", FLOAT_BITS) != FLOAT_BITS:
        return True
    return any(bits != FLOAT_BITS for _, bits in config_dict.get("activation_overrides") or ())


def _activation_only_config(config_dict):
    config = dict(config_dict)
    config.update(weight_bits=FLOAT_BITS, layer_bits=None, weight_overrides=())
    try:
        return tfquant.QuantConfig(**config)
    except (TypeError, ValueError) as exc:
        raise ExportError("report config is not valid: %s" % " ".join(str(exc).split())) from None


def freeze_inference_graph(build_forward, weights, config_dict=None, input_shape=None,
                           quantize_activations=True):
    """A self-contained inference GraphDef: weights as constants, input 'input', output 'logits'.

    Args:
      build_forward: images -> logits; builds the model's evaluation forward pass (creating its
        variables with tf.compat.v1.get_variable) in the current graph.
      weights: dict variable name -> array (load_packed_weights output); quantized weights are
        already dequantized, so the result holds no weight quantization op.
      config_dict: the report's config; when it quantizes activations they are quantized in the
        result too, with the stored moving-average ranges.
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
    config_dict = config_dict or {}
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, list(input_shape), name=INPUT_NAME)
        logits = build_forward(images)
        if quantize_activations and quantizes_activations(config_dict):
            tfquant.quantize_graph(graph, _activation_only_config(config_dict), is_training=False)
        with graph.name_scope(None):
            output = tf.identity(logits, name=OUTPUT_NAME)
        if output.op.name != OUTPUT_NAME or images.op.name != INPUT_NAME:
            raise ExportError("the forward pass already defines an op named %r or %r; rename it so "
                              "the exported graph's input and output keep their names"
                              % (INPUT_NAME, OUTPUT_NAME))
        assigns, feeds, used = [], {}, set()
        for variable in tf1.global_variables():
            name = variable.op.name
            shape = variable.shape.as_list()
            if name.endswith(_COUNTER_SUFFIXES) and name not in weights:
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
                        if quantize_activations or range_marker not in name)
        if unused:
            raise ExportError("the exported weights hold %d variable(s) the model does not define, e.g. %s; "
                              "expected weights of this model" % (len(unused), unused[0]))
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
