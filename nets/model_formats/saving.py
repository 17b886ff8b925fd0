"""The fine-tuned model written back in its file's format (--save_model).

Weights are the packed export's values (tfquant.export.model_export): quantized weights decoded from their
integer codes, so each lies on its quantized grid, and every other variable as trained. A frozen graph and a
SavedModel hold the quantized model's whole inference graph (tfquant.export.frozen_graph: activations quantized
with the recorded ranges as they were in training), so reloading gives the quantized model's predictions
exactly. A Keras 3 file that was rebuilt layer by layer gets the quantized activations too: the recorded grid
after each layer whose output the quantizer reads, written with Keras's own operations
(nets.model_formats.keras3_activations; a frozen SeparableConv2D whose depthwise output is quantized is written as
DepthwiseConv2D, that grid, then a 1x1 Conv2D), and each bias the quantized graph rounds to its int32 grid is
written rounded (quantized_biases), so reloading gives the quantized scores bit for bit. Grids the quantized graph
puts inside a frozen layer are written by splitting the layer into built-in layers and Keras operations: a
self-attention MultiHeadAttention (its query/key/value projections, their grids before the biases, then a
MultiHeadAttention with identity projections), a Dense on a rank-3 input (its Tensordot MatMul's input and output,
before the bias) and a LayerNormalization whose offset is rounded. A Keras file run as one frozen graph, and a
tf_keras file, hold only weights, so their activations are float (their 8-bit rounding rarely moves a prediction).
"""
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from nets.model_formats import ModelFileError, keras3_activations
from tfquant.export import frozen_graph, inference_graph, model_export
from tfquant.report import load_report

tf1 = tf.compat.v1
MODEL_SCOPE = "model"


def check_save_path(path, kind, folds_batch_norms):
    """Refuse a --save_model path that cannot hold `kind` before training starts."""
    if kind in ("keras3", "tf_keras") and not path.endswith((".keras", ".h5")):
        raise ModelFileError("--save_model=%s is not valid for a Keras file; expected a path ending in .keras (or .h5)"
                             % path, path=path)
    if kind == "keras3" and folds_batch_norms:
        raise ModelFileError("--save_model=%s with --uql_fold_batch_norms is not valid for a Keras 3 file (its "
                             "batch-norm layers cannot hold folded weights); expected --save_model without folding, "
                             "or the frozen graph of --exec_mode export" % path, path=path)
    if kind == "frozen_graph" and not path.endswith(".pb"):
        raise ModelFileError("--save_model=%s is not valid for a frozen graph; expected a path ending in .pb" % path,
                             path=path)
    if kind == "saved_model" and os.path.lexists(path):
        raise ModelFileError("--save_model=%s exists; expected a new directory for the SavedModel" % path, path=path)


def exported_weights(checkpoint, report_path):
    """{variable name: value} as the packed export holds them, and the quantized model's frozen GraphDef.

    Args:
      checkpoint: the quantized run's checkpoint prefix.
      report_path: its quant_report.json (the inference graph is beside it).
    Returns:
      (weights dict, GraphDef with input 'input' and output 'logits').
    """
    run_dir = os.path.dirname(os.path.abspath(report_path))
    report = load_report(report_path)
    saved = inference_graph.InferenceGraph(os.path.join(run_dir, inference_graph.INFERENCE_GRAPH_NAME))
    folded = None
    if report.config.get("fold_batch_norms"):
        folded = frozen_graph.folded_weight_values(saved.build_forward, checkpoint, saved.input_shape)
    with tempfile.TemporaryDirectory() as scratch:
        packed = os.path.join(scratch, "model.tfq")
        model_export.pack_checkpoint(checkpoint, report, packed, metadata={"input_shape": saved.input_shape},
                                     folded_weights=folded)
        weights, _ = model_export.load_packed_weights(packed)
    graph_def = frozen_graph.freeze_inference_graph(saved.build_forward, weights, report, saved.input_shape)
    return weights, graph_def


def quantized_biases(graph_def, weights, input_shape):
    """{bias variable name: the value the quantized model adds} of each bias its evaluation graph puts on the int32
    grid of the input's step times the weight's (tfquant.quantize.quantize_biases, with symmetric weights and
    quantized inputs).

    A Keras file holds a layer's bias as a weight, not the graph that rounds it: written as trained, the bias
    would move outputs next to a rounding boundary of the next quantized activation by one step (measured: 7 % of
    the scores of a conv + batch norm model differed; with these values none does).
    Args:
      graph_def: the quantized model's frozen GraphDef (exported_weights), input 'input'.
      weights: {variable name: value} of the same export (the names the biases are found by).
      input_shape: [None, ...] of the model input.
    """
    graph = tf.Graph()
    with graph.as_default():
        tf1.import_graph_def(graph_def, name="")
    found = {}
    for op in graph.get_operations():
        if op.type not in ("BiasAdd", "Add", "AddV2"):
            continue
        for tensor in op.inputs:
            if "/bias_quant/" in tensor.name:
                name = _bias_variable(tensor, weights)
                if name is not None:
                    found[name] = tensor
    if not found:
        return {}
    images = graph.get_tensor_by_name(inference_graph.INPUT_NAME + ":0")
    with tf1.Session(graph=graph) as sess:
        # The grid comes from recorded ranges, not the images: one blank image runs the subgraph.
        values = sess.run(found, {images: np.zeros([1] + list(input_shape[1:]), np.float32)})
    return {name: np.asarray(value, np.float32) for name, value in values.items()}


def _bias_variable(tensor, weights):
    """The variable (a key of `weights`) whose value a bias_quant subgraph rounds, or None: the one of the bias's
    size among its sources, read directly or reshaped (a frozen layer's bias); the others are the weight and the
    input range the step is made of."""
    size = tensor.shape.num_elements()
    seen, todo = set(), [tensor.op]
    while todo:
        op = todo.pop()
        for name in (op.name, op.name[:-len("/read")] if op.name.endswith("/read") else None):
            if name in weights and np.size(weights[name]) == size and not name.endswith(_RANGE_SUFFIXES):
                return name
        if op.name in seen or ("/bias_quant/" not in op.name and op.type not in _SHAPE_ONLY):
            continue
        seen.add(op.name)
        todo.extend(source.op for source in (op.inputs if op.type not in _SHAPE_ONLY else op.inputs[:1]))
    return None


# Ops between a bias variable and its reader that only pass or reshape it.
_SHAPE_ONLY = ("Identity", "Reshape", "Squeeze", "ExpandDims")
_RANGE_SUFFIXES = ("/ema_min", "/ema_max", "/ema_steps")


def _with_file_names(graph_def, input_shape, input_op, output_op, softmax):
    """The quantized GraphDef with the file's input and output op names (and its softmax head back)."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, input_shape, name=input_op)
        (logits,) = tf1.import_graph_def(graph_def, input_map={inference_graph.INPUT_NAME + ":0": images},
                                         return_elements=[inference_graph.OUTPUT_NAME + ":0"], name="quantized")
        output = tf.identity(tf.nn.softmax(logits) if softmax else logits, name=output_op)
        if images.op.name != input_op or output.op.name != output_op:
            raise ModelFileError("the names %s and %s cannot both be kept; expected distinct input and output names"
                                 % (input_op, output_op))
    return graph.as_graph_def()


def save_frozen_graph(graph_def, helper, path):
    """A frozen graph with the file's input and output names."""
    info = helper.file_graph.save_info
    output_op, _, index = info["output_name"].partition(":")
    if index not in ("", "0"):
        output_op = output_op + "_output"
    graph_def = _with_file_names(graph_def, helper.input_shape, info["input_op"], output_op,
                                 helper.prepared.output_is_softmax)
    from tfquant import files  # pylint: disable=import-outside-toplevel
    files.write_atomically(path, graph_def.SerializeToString())
    return "frozen graph (input %s, output %s)" % (info["input_op"], output_op)


def save_saved_model(graph_def, helper, path):
    """A SavedModel whose signature (same name, input key and output key) runs the quantized graph."""
    info = helper.file_graph.save_info
    softmax = helper.prepared.output_is_softmax

    def imported():
        tf1.import_graph_def(graph_def, name="")

    wrapped = tf1.wrap_function(imported, [])
    forward = wrapped.prune(inference_graph.INPUT_NAME + ":0", inference_graph.OUTPUT_NAME + ":0")
    spec = tf.TensorSpec([None] + list(helper.input_shape[1:]), tf.float32, name=info["input_key"])
    output_key = info["output_key"]

    module = tf.Module()
    module.forward = forward

    @tf.function(input_signature=[spec])
    def serve(images):
        logits = module.forward(images)
        return {output_key: tf.nn.softmax(logits) if softmax else logits}

    module.serve = serve
    staging = "%s.tmp-%d" % (os.path.normpath(path), os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    tf.saved_model.save(module, staging, signatures={info["signature"]: serve})
    os.replace(staging, path)
    dropped = info.get("other_outputs") or []
    return "SavedModel (signature %s: %s -> %s%s)" % (
        info["signature"], info["input_key"], output_key,
        "; its other outputs %s are not kept" % ", ".join(dropped) if dropped else "")


def _keras3_quantized_activations(helper, model, checkpoint, report_path):
    """`model` with the quantized activations of a rebuilt Keras 3 run, and what the description says of them."""
    import keras  # pylint: disable=import-outside-toplevel  (Keras 3, only for its files)
    grids, unsupported = keras3_activations.activation_grids(load_report(report_path), checkpoint)
    before, tensors = {}, {grid.op_name: None for grid in grids}
    layers = keras3_activations.layer_of_ops(helper.rebuild_plan, helper.input_shape, MODEL_SCOPE, before, tensors)
    by_layer, before_activation, input_grid, inside_separable, inside_attention = {}, {}, None, {}, {}
    inside_dense, inside_layer_norm = {}, {}
    for grid in grids:
        # A layer output or input --uql_quantize_layer_outputs quantized is named after its weight op.
        op_name, is_input = tensors.get(grid.op_name) or (grid.op_name, False)
        separable = _separable_owning(model, op_name)
        if op_name in layers:
            by_layer[layers[op_name]] = grid
        elif op_name in before:
            before_activation[before[op_name]] = grid  # a Dense's logits before its softmax
        elif is_input and input_grid is None:
            input_grid = grid  # the model input a layer reads
        elif separable is not None and separable not in inside_separable:
            inside_separable[separable] = grid  # a frozen SeparableConv2D's depthwise output
        elif (projection := _attention_projection(model, op_name)) is not None:
            attention, part = projection  # a frozen MultiHeadAttention's projection
            inside_attention.setdefault(attention, {})[part] = grid
        elif (dense_side := _tensordot_dense(model, grid.op_name)) is not None:
            dense, part = dense_side  # a frozen Dense on a rank-3 input
            inside_dense.setdefault(dense, {})[part] = grid
        elif (layer_norm := _layer_norm_offset(model, op_name)) is not None:
            inside_layer_norm[layer_norm] = grid  # a frozen LayerNormalization's offset
        else:
            unsupported.append(grid.op_name)  # inside a layer, not its output
    if not by_layer and not unsupported and not before_activation and input_grid is None and not inside_separable \
            and not inside_attention and not inside_dense and not inside_layer_norm:
        return model, "activations float as in the quantized model"
    with tf.init_scope():
        model, applied = keras3_activations.with_quantized_activations(keras, model, by_layer, input_grid,
                                                                       before_activation, inside_separable,
                                                                       inside_attention, inside_dense,
                                                                       inside_layer_norm)
    unsupported += [grid.op_name for name, grid in list(by_layer.items()) + list(before_activation.items())
                    if name not in applied]
    unsupported += [grid.op_name for name, grid in inside_separable.items()
                    if keras3_activations.SEPARABLE_PREFIX + name not in applied]
    unsupported += [grid.op_name for name, grids in inside_attention.items() for part, grid in grids.items()
                    if keras3_activations.ATTENTION_PREFIX + name + "/" + part not in applied]
    # A split SeparableConv2D's depthwise grid follows a layer of the saved file (<name>_depthwise): counted.
    split = sorted(name for name in inside_separable if keras3_activations.SEPARABLE_PREFIX + name in applied)
    if input_grid is not None and keras3_activations.INPUT_LAYER not in applied:
        unsupported.append(input_grid.op_name)
    said = "activations quantized after %d layers as in the quantized model" % len(applied)
    if split:
        said += "; %s split into DepthwiseConv2D, its depthwise output's grid and a 1x1 Conv2D (<name>_depthwise, " \
                "<name>_pointwise)" % ", ".join(split)
    unsupported += [grid.op_name for name, grids in inside_dense.items() for part, grid in grids.items()
                    if keras3_activations.DENSE_PREFIX + name + "/" + part not in applied]
    unsupported += [grid.op_name for name, grid in inside_layer_norm.items()
                    if keras3_activations.LAYER_NORM_PREFIX + name not in applied]
    attention = sorted(name for name in inside_attention
                       if any(key.startswith(keras3_activations.ATTENTION_PREFIX + name + "/") for key in applied))
    if attention:
        said += "; %s split into its query/key/value projections (<name>_query, ...), their outputs' grids and a " \
                "MultiHeadAttention with identity projections" % ", ".join(attention)
    if unsupported:
        said += "; float at %s (not a layer output, or no recorded range)" % ", ".join(sorted(unsupported))
    return model, said


def _scoped_layer(model, parts, type_name):
    """The layer of a rebuilt model whose scope an op name's parts ('model/<layer>/...') start with, if it is a
    `type_name` (a Keras class name), else None."""
    try:
        layer = model.get_layer(parts[1])
    except ValueError:
        return None
    return layer if type(layer).__name__ == type_name else None


def _attention_projection(model, op_name):
    """(MultiHeadAttention layer name, 'query' | 'key' | 'value') of a projection op inside a rebuilt model's frozen
    MultiHeadAttention layer ('model/mha/mha_1/query_1/MatMul'), or None."""
    parts = op_name.split("/")
    if len(parts) < 4 or parts[0] != MODEL_SCOPE:
        return None
    layer = _scoped_layer(model, parts, "MultiHeadAttention")
    if layer is None:
        return None
    for part in parts[2:-1]:
        base, _, number = part.rpartition("_")
        base = base if base and number.isdigit() else part
        if base in keras3_activations.ATTENTION_PROJECTIONS:
            return layer.name, base
    return None


def _tensordot_dense(model, report_name):
    """(Dense layer name, 'input' | 'output') of a report's '<op>:input' / '<op>:output' naming the Tensordot MatMul
    of a rebuilt model's frozen Dense on a rank-3 input ('model/embed/embed_1/Tensordot/MatMul:output'), or None."""
    op_name, _, side = report_name.rpartition(":")
    parts = op_name.split("/")
    if side not in ("input", "output") or len(parts) < 4 or parts[0] != MODEL_SCOPE or parts[-2:] != [
            "Tensordot", "MatMul"]:
        return None
    layer = _scoped_layer(model, parts, "Dense")
    return (layer.name, side) if layer is not None else None


def _layer_norm_offset(model, op_name):
    """The LayerNormalization layer whose offset (beta - mean * rsqrt(variance + epsilon) * gamma, the op 'add_1' of
    Keras's layer on TensorFlow) a rebuilt model's frozen layer computes in `op_name`, or None."""
    parts = op_name.split("/")
    if len(parts) < 3 or parts[0] != MODEL_SCOPE or parts[-1] != "add_1":
        return None
    layer = _scoped_layer(model, parts, "LayerNormalization")
    return layer.name if layer is not None else None


def _separable_owning(model, op_name):
    """The name of the SeparableConv2D layer whose depthwise conv op (in a rebuilt model's graph) is `op_name`."""
    parts = op_name.split("/")
    if len(parts) < 3 or parts[0] != MODEL_SCOPE or not op_name.endswith("/depthwise"):
        return None
    layer = _scoped_layer(model, parts, "SeparableConv2D")
    return layer.name if layer is not None else None


def save_keras(weights, helper, path, checkpoint=None, report_path=None):
    """The Keras model (Keras 3 or tf_keras) with the exported weights, saved atomically."""
    activations = "activations float"
    if helper.kind == "keras3" and getattr(helper, "rebuild_plan", None) is not None:
        # A rebuilt model's variables are its Keras weights, moving statistics included.
        model = helper.keras3_model
        by_path = {w.path: w for w in model.weights}
        targets = {"%s/%s" % (MODEL_SCOPE, name): by_path[path]
                   for path, name in helper.rebuild_plan.variable_names.items()}
    elif helper.kind == "keras3":
        targets = {}
        keras_weights = helper.file_graph.save_info["weights"]
        for parameter in helper.prepared.parameters.values():
            keras_weight = keras_weights.get(parameter.source_const or parameter.const_name)
            if keras_weight is not None:
                targets["%s/%s" % (MODEL_SCOPE, parameter.name)] = keras_weight
        model = helper.file_graph.save_info["keras_model"]
    else:
        from nets.keras_model import weight_key  # pylint: disable=import-outside-toplevel
        model = helper.source
        targets = {"%s/%s" % (MODEL_SCOPE, weight_key(w.name)): w for w in model.weights}
    missing = sorted(name for name in targets if name not in weights)
    if missing:
        raise ModelFileError("the run's weights lack %s; expected the checkpoint of this model" % missing[0])
    with tf.init_scope():
        for name, keras_weight in targets.items():
            # A kernel the graph reads reshaped (EinsumDense) goes back in the layer's own shape.
            keras_weight.assign(np.asarray(weights[name], dtype=np.float32).reshape(keras_weight.shape))
    if helper.kind == "keras3" and getattr(helper, "rebuild_plan", None) is not None and checkpoint:
        model, activations = _keras3_quantized_activations(helper, model, checkpoint, report_path)
    with tf.init_scope():
        base, suffix = os.path.splitext(path)
        temporary = "%s.tmp-%d%s" % (base, os.getpid(), suffix)
        model.save(temporary)
        os.replace(temporary, path)
    return "Keras file (weights on the quantized grid; %s)" % activations


def save_model(helper, checkpoint, report_path, path):
    """Write the fine-tuned model of `helper` in its file's format at `path`; returns a description."""
    weights, graph_def = exported_weights(checkpoint, report_path)
    kind = getattr(helper, "kind", "tf_keras")
    if kind == "frozen_graph":
        return save_frozen_graph(graph_def, helper, path)
    if kind == "saved_model":
        return save_saved_model(graph_def, helper, path)
    # A Keras file's biases are weights: the values the quantized model adds, where it rounds them.
    weights = dict(weights, **quantized_biases(graph_def, weights, helper.input_shape))
    return save_keras(weights, helper, path, checkpoint, report_path)
