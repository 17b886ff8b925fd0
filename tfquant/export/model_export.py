"""Export a quantized checkpoint: the packed `.tfq` model file (the frozen inference graph built from it is
frozen_graph's).

The packed file holds, for every quantized weight of a QuantReport, the integer codes and the
per-group (alpha, beta) that the training graph used, computed by the very same TensorFlow ops
(the run's `tfquant.weight_grids` grid); every other stored variable goes in as float32.  Dequantizing it
(`load_packed_weights`) gives the quantized weights bit for bit, so a frozen graph built from them
predicts exactly what the quantized checkpoint predicts.
"""
import glob
import os

import numpy as np
import tensorflow as tf

import tfquant
from tfquant import checkpoints, files, ranges, weight_grids
from tfquant.config import FLOAT_BITS
from tfquant.errors import TfquantError
from tfquant.export import packed_file, packed_reader
from tfquant.report import (DECISIONS_VARIABLE, decisions_difference, layer_difference, layer_layout, load_report,
                            unmatched_layers)


SIZE_SLACK_RATIO = 1.02
SIZE_SLACK_BYTES = 4096
# Training-only counters of a range (ema_steps, init_steps); 0 would make the frozen graph ignore the
# stored range.
COUNTER_SUFFIXES = tuple("/" + name for name in ranges.COUNTER_NAMES)


class ExportError(TfquantError, ValueError):
    """Checkpoint, report or weights do not fit together; the message is one line naming what."""


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
    # TensorFlow would block forever on a FIFO and read a device without end: only regular files pass.
    files.regular_file_size(checkpoint + ".index", ExportError, "checkpoint index")
    shards = glob.glob(glob.escape(checkpoint) + ".data-?????-of-?????")
    if not shards:
        raise ExportError("checkpoint %s has no data file (%s.data-00000-of-00001); expected a complete checkpoint"
                          % (checkpoint, checkpoint))
    for shard in shards:
        files.regular_file_size(shard, ExportError, "checkpoint data file")
    try:
        return tf.train.load_checkpoint(checkpoint)
    except (tf.errors.OpError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError("checkpoint %s cannot be read (%s)" % (checkpoint, first)) from None


def _tensor(reader, checkpoint, name):
    """One checkpoint value; a truncated or damaged data file becomes an ExportError."""
    try:
        return reader.get_tensor(name)
    except (tf.errors.OpError, ValueError, IndexError) as exc:  # a short data file raises IndexError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError("checkpoint %s: variable %s cannot be read (%s)" % (checkpoint, name, first)) from None


def _layout(layer):
    try:
        return layer_layout(layer)
    except ValueError as exc:
        raise ExportError("report layer %s: %s" % (layer.name, exc)) from None


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
    return np.asarray(_tensor(reader, checkpoint, name), dtype=np.float32)


def _learned_steps(reader, checkpoint, layer):
    """(step sizes or None, initialised) of a weight layer trained with learned (LSQ) step sizes."""
    if not layer.range_variables:
        return None
    name = layer.range_variables[0]
    step = _read_checked(reader, checkpoint, name, [layer.num_groups])
    counter = name.rpartition("/")[0] + "/" + ranges.COUNTER_NAMES[1]
    seen = counter not in reader.get_variable_to_shape_map() or int(reader.get_tensor(counter)) > 0
    return step, seen


def _compute_codes(quantized, config):
    """(codes, alpha, beta) of each (layer, value, learned steps) triple on the layer's grid, by the training
    graph's ops."""
    items = []
    for layer, value, learned in quantized:
        # A checkpoint saved before its first step has no trained steps: training would use the initial ones.
        steps = learned[0] if learned is not None and learned[1] else None
        items.append((weight_grids.for_layer(layer, config), value, layer.bits, _layout(layer), steps))
    return weight_grids.compute_codes(items)


def _check_decisions(reader, checkpoint, report):
    """A checkpoint that records its quantization decisions must have been trained with the report's."""
    if DECISIONS_VARIABLE not in reader.get_variable_to_shape_map():
        return  # written by a graph tfquant's learners did not build; the layer checks still apply
    recorded = _tensor(reader, checkpoint, DECISIONS_VARIABLE)
    recorded = recorded.decode("utf-8", "replace") if isinstance(recorded, bytes) else str(recorded)
    difference = decisions_difference(recorded, report)
    if difference:
        raise ExportError("report does not match checkpoint %s: %s; expected the report written with this checkpoint"
                          % (checkpoint, difference))


def _check_activation_ranges(reader, checkpoint, report):
    """Every quantized activation's range variables are in the checkpoint as scalars, and were recorded.

    Raises:
      ExportError: a range variable is missing or not a scalar, or training never updated a moving
        average (its ema_steps counter is 0), which would freeze the range at its initial [0, 0].
    """
    shapes = reader.get_variable_to_shape_map()
    unrecorded = []
    for layer in report.activation_layers:
        if not layer.quantized:
            continue
        names = list(layer.range_variables or ())
        if names:
            # The update counter is training state, not in the report; it sits in the same scope
            # (ema_steps for moving-average ranges, init_steps for learned ones).
            scope = names[0].rpartition("/")[0]
            counters = [scope + suffix for suffix in COUNTER_SUFFIXES if scope + suffix in shapes]
            names.append(counters[0] if counters else scope + COUNTER_SUFFIXES[0])
        for name in names:
            if name not in shapes:
                raise ExportError("checkpoint %s has no variable %s (the range of activation %s in the report)"
                                  % (checkpoint, name, layer.name))
            if list(shapes[name]):
                raise ExportError("variable %s has shape %s in checkpoint %s; expected a scalar activation range"
                                  % (name, list(shapes[name]), checkpoint))
            if name.endswith(COUNTER_SUFFIXES) and int(_tensor(reader, checkpoint, name)) <= 0:
                unrecorded.append(layer.name)
    if unrecorded:
        raise ExportError("checkpoint %s: the ranges of %d quantized activation(s) were never recorded in training "
                          "(e.g. %s); expected a checkpoint trained for at least one step with these activations "
                          "quantized" % (checkpoint, len(unrecorded), unrecorded[0]))


_COMPARED_FIELDS = ("name", "kind", "op_type", "status", "bits", "weight_variable", "input_index", "shape",
                    "bucket_type", "bucket_size", "channel_axes", "num_groups", "range_variables", "weight_grid")


def check_report_matches_model(saved, rebuilt, report_path):
    """Refuse a report that does not describe this model layer for layer.

    Args:
      saved: the QuantReport read from the run directory.
      rebuilt: the QuantReport of the model's graph quantized with config_from_report(saved).
      report_path: named in the message.
    Raises:
      ExportError: naming the first layer (or stored variable) whose name, shape, bits, buckets or
        range groups differ.
    """
    unmatched = unmatched_layers(saved, rebuilt)
    if unmatched:
        raise ExportError("report %s does not match the model: %s; expected the report written with this checkpoint "
                          "and model" % (report_path, unmatched))
    difference = layer_difference(saved, rebuilt, _COMPARED_FIELDS)
    if difference is not None:
        number, name, field, saved_value, rebuilt_value = difference
        raise ExportError("report %s does not match the model: layer %d (%s) has %s=%r in the report, %r in "
                          "the model; expected the report written with this checkpoint and model"
                          % (report_path, number, name, field, saved_value, rebuilt_value))
    if len(rebuilt.layers) != len(saved.layers):
        raise ExportError("report %s does not match the model: it lists %d candidate ops, the model has %d"
                          % (report_path, len(saved.layers), len(rebuilt.layers)))
    ours = {(r.name, tuple(r.shape)) for r in rebuilt.other_variables}
    theirs = {(r.name, tuple(r.shape)) for r in saved.other_variables}
    if ours != theirs:
        name, shape = sorted(ours ^ theirs)[0]
        raise ExportError("report %s does not match the model: variable %s with shape %s is only in the %s"
                          % (report_path, name, list(shape), "model" if (name, shape) in ours else "report"))


def _check_weight_layers(report):
    """Buckets of every quantized weight layer agree with the report's own settings (a layer an override set
    records its own; the rebuilt model is checked against them)."""
    config = report.config
    bucket_type = config.get("bucket_type") if config.get("use_buckets") else None
    for layer in report.weight_layers:
        if not layer.quantized or layer.setting_source is not None:
            continue
        if layer.bucket_type != bucket_type or (
                bucket_type in ("split", "block") and layer.bucket_size != config.get("bucket_size")):
            raise ExportError("report layer %s has buckets %s/%s but the report's config says %s/%s; expected "
                              "the report written with the checkpoint" % (
                                  layer.name, layer.bucket_type, layer.bucket_size, bucket_type,
                                  config.get("bucket_size")))


def pack_checkpoint(checkpoint, report, output_path, metadata=None, folded_weights=None):
    """Write the packed model file (.tfq) of a quantized checkpoint.

    Args:
      checkpoint: checkpoint prefix (or a directory: its latest checkpoint).
      report: the QuantReport of the quantized graph (object, dict or JSON path).
      output_path: destination file; written atomically, untouched on any error.
      metadata: optional JSON-serialisable dict stored under metadata['user'].
      folded_weights: for a report with fold_batch_norms, {weight variable name: W * gamma / sigma}
        (folded_weight_values); the file stores those weights' codes in place of W.
    Returns:
      stats dict: path, file_bytes, bound_bytes (1.02 * total_storage_bits / 8 + 4096),
      within_bound, total_storage_bits (the report's), accounted_bits (the file's tensors),
      float_storage_bits, quantized_tensors, float_tensors, compression_ratio (float32 size of the
      model over file_bytes).
    Raises:
      ExportError: the checkpoint misses a variable of the report, holds it with another shape, or never
        recorded the range of a quantized activation.
      ReportError: the report is malformed.
    """
    report = load_report(report)
    checkpoint = resolve_checkpoint(checkpoint)
    reader = _open_checkpoint(checkpoint)
    if metadata is not None and not isinstance(metadata, dict):
        raise ExportError("metadata must be a dict, got %s" % type(metadata).__name__)

    # Everything is read and checked before anything is written, so an error leaves no file.
    _check_weight_layers(report)
    _check_decisions(reader, checkpoint, report)
    _check_activation_ranges(reader, checkpoint, report)
    stored = _stored_variables(report)
    values = {name: _read_checked(reader, checkpoint, name, shape) for name, shape, _ in stored}
    if report.config.get("fold_batch_norms"):
        if folded_weights is None:
            raise ExportError("report of checkpoint %s folds batch norms; expected the folded weights "
                              "(folded_weight_values) to pack" % checkpoint)
        for name, value in folded_weights.items():
            if name not in values or values[name].shape != np.shape(value):
                raise ExportError("folded weight %s does not match a stored variable of checkpoint %s"
                                  % (name, checkpoint))
            values[name] = np.asarray(value, np.float32)
    quantized = [(layer, values[name], _learned_steps(reader, checkpoint, layer))
                 for name, _, layer in stored if layer is not None]
    # The report was validated (report_schema), so its config and its layers name known grids.
    codes = iter(_compute_codes(quantized, report.config))
    tensors = []
    for name, _, layer in stored:
        if layer is None:
            tensors.append(packed_file.FloatTensor(name, values[name]))
            continue
        layer_codes, alpha, beta = next(codes)
        layout = _layout(layer)
        tensors.append(packed_file.QuantizedTensor(
            name, tuple(values[name].shape), layer.bits, layout.kind,
            layout.channel_axes if layout.kind in ("channel", "block") else None, layout.bucket_size,
            layer_codes, alpha, beta))

    total_bits = report.total_storage_bits
    info = {
        "format": "tfquant packed model",
        "tfquant_version": tfquant.__version__,
        "checkpoint": os.path.basename(checkpoint),
        "config": report.config,
        "total_storage_bits": total_bits,
        "float_storage_bits": report.float_storage_bits,
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
    tensors, metadata = packed_reader.read_packed_model(path)
    weights = {}
    tensors.reverse()
    while tensors:
        # Each tensor's codes are released once dequantized, so codes and floats never all coexist.
        tensor = tensors.pop()
        if isinstance(tensor, packed_file.QuantizedTensor):
            weights[tensor.name] = tensor.dequantize()
        else:
            weights[tensor.name] = tensor.array
    return weights, metadata
