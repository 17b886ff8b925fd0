"""How exported files depart from the quantized TF graph: images classified differently, and where an int8
TFLite model starts to compute something other than the graph it was converted from.

For every int8 tensor an operator of the TFLite model writes, the TF graph's value of the same tensor is
put on that tensor's integer grid (its scale and zero point) and the codes are compared: the share of codes
that differ and by how many steps at most. Both run the same images; the TFLite model on its built-in
kernels (a delegate such as XNNPACK hides intermediate tensors). The first layers show what the integer
arithmetic changes locally (requantization, int32 bias); later layers show how those one-step differences
spread. Nothing here changes a model.

The TFLite converter names an operator's output after the TF ops it fused (`a;b;c`); the TF graph gives the
tensor tfquant quantized as `<op>/fake_quant/FakeQuantWithMinMaxVars`, which is looked up for each fused
name in turn, then the op itself when nothing quantized it (a mean, a reshape).
"""
import numpy as np
import tensorflow as tf

from tfquant.export import tflite_export

_FAKE_QUANT_SUFFIX = "/fake_quant/FakeQuantWithMinMaxVars"
INPUT = "(input)"  # the "op" of the record comparing the model's input codes


def _tf_tensor_name(tflite_name, node_names):
    """The TF tensor a TFLite tensor holds, or None when none of its fused names is in the graph."""
    parts = tflite_name.split(";")
    for part in parts:
        if part + _FAKE_QUANT_SUFFIX in node_names:
            return part + _FAKE_QUANT_SUFFIX + ":0"
    for part in parts:
        if part in node_names:
            return part + ":0"
    return None


def _int8_intermediates(model, images):
    """[(op name, TFLite tensor name, codes, scale, zero point)] of every int8 operator output, in run order.

    A model that runs at its declared batch of 1 only (tflite_export.run_tflite) is run one image at a time,
    each tensor's codes stacked along the batch.
    """
    try:
        return _int8_intermediates_at_once(model, images)
    except RuntimeError:
        if len(images) <= 1:
            raise
    per_image = [_int8_intermediates_at_once(model, image[None]) for image in images]
    return [(op, name, np.concatenate([found[k][2] for found in per_image]), scale, zero_point)
            for k, (op, name, _, scale, zero_point) in enumerate(per_image[0])]


def _int8_intermediates_at_once(model, images):
    """_int8_intermediates with every image in one invoke (RuntimeError when the model cannot resize)."""
    interpreter = tflite_export.make_interpreter(model, default_delegates=False, preserve_all_tensors=True)
    index_in = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index_in, [len(images)] + list(images.shape[1:]))
    interpreter.allocate_tensors()
    in_detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(in_detail["index"], tflite_export.quantize_input(images, in_detail))
    interpreter.invoke()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    found = []
    if in_detail["dtype"] == np.int8:
        found.append((INPUT, in_detail["name"], interpreter.get_tensor(in_detail["index"]),
                      in_detail["quantization"][0], in_detail["quantization"][1]))
    for op in interpreter._get_ops_details():  # pylint: disable=protected-access
        for index in op["outputs"]:
            detail = details[index]
            if detail["dtype"] != np.int8 or not detail["quantization"][0]:
                continue
            found.append((op["op_name"], detail["name"], interpreter.get_tensor(index),
                          detail["quantization"][0], detail["quantization"][1]))
    return found


def layer_divergence(graph_def, model, images, input_name="input:0"):
    """Per int8 tensor of `model`, how its codes differ from `graph_def`'s values on the same grid.

    Args:
      graph_def: the frozen TF graph the int8 model was converted from (FakeQuant ops carrying its ranges).
      model: the int8 .tflite bytes or path.
      images: float32 [N, ...] preprocessed images (N small: every intermediate tensor is kept).
      input_name: the graph's input tensor.
    Returns:
      [{"op": TFLite operator, "tensor": TF tensor compared (None: no counterpart found), "differ": share of
      codes that differ, "max_steps": largest difference in steps}], in the order the operators run.
    """
    images = np.asarray(images, dtype=np.float32)
    intermediates = _int8_intermediates(model, images)
    node_names = {node.name for node in graph_def.node}
    names = [_tf_tensor_name(tflite_name, node_names) for _, tflite_name, _, _, _ in intermediates]
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    fetched = sorted({name for name in names if name is not None})
    with tf.compat.v1.Session(graph=graph) as sess:
        values = dict(zip(fetched, sess.run(fetched, {input_name: images})))
    records = []
    for (op, _, codes, scale, zero_point), name in zip(intermediates, names):
        record = {"op": op, "tensor": name, "differ": None, "max_steps": None}
        # A fully connected layer run as a 1x1 convolution holds [N, 1, 1, C] where the graph has [N, C].
        if name is not None and values[name].size == codes.size:
            info = np.iinfo(codes.dtype)
            tf_values = values[name].reshape(codes.shape).astype(np.float64)
            tf_codes = np.clip(np.round(tf_values / scale) + zero_point, info.min, info.max)
            steps = np.abs(tf_codes - codes.astype(np.float64))
            record.update(differ=float(np.mean(steps > 0)), max_steps=int(steps.max()))
        records.append(record)
    return records


def _top_two_tied(logits):
    top_two = np.sort(logits, axis=1)[:, -2:]
    return top_two[:, 0] == top_two[:, 1]


# Disagreeing images whose TF-graph margins export.json lists (the largest ones; the maximum is over all).
MARGINS_KEPT = 100
# Most levels a grid read off the logits may have: finer "grids" are float32's own spacing, not a quantizer's.
MAX_OUTPUT_LEVELS = 1 << 16


def output_step(logits):
    """The step of the grid every value of `logits` lies on (a quantized output), or None when there is none.

    Read off the values themselves: the smallest gap between distinct values is taken as the step, and kept
    only if every value is the lowest one plus a whole number of steps (to 1 % of a step) on at most
    MAX_OUTPUT_LEVELS levels.

    Args:
      logits: [N, classes] outputs of one model.
    Returns:
      the step (float), or None.
    """
    values = np.unique(np.asarray(logits, dtype=np.float64))
    if len(values) < 2:
        return None
    spread = values[-1] - values[0]
    levels = spread / np.diff(values).min()
    if levels > MAX_OUTPUT_LEVELS:
        return None
    step = spread / round(levels)  # the span over whole steps: the gap's own rounding averaged out
    positions = (values - values[0]) / step
    if np.max(np.abs(positions - np.round(positions))) > 0.01:
        return None
    return float(step)


def _rounded(value):
    """Four significant digits: a margin of 0.99999994 steps reads 1."""
    return float("%.4g" % value)


def _top_two_margin(logits):
    top_two = np.sort(np.asarray(logits, dtype=np.float64), axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def disagreements(reference, logits):
    """How many images `logits` classify differently from `reference`, how many of those are ties, and by
    how much `reference` preferred its class on each of them.

    A tie is an image whose two largest logits are equal in either model: with quantized logits (an int8
    model's output grid) its class is decided by the classes' order, not by the model, so one step of
    integer rounding anywhere in the network can change it. The margin of a disagreeing image is the
    reference's largest logit minus its second largest: in steps of the reference's output grid when its
    logits are quantized (output_step), else in logits. Small margins mean the images were near-ties that a
    different accumulation order can flip.

    Returns:
      {"images": disagreeing images, "tied": those tied in either model, "reference_ties": images whose
      two largest reference logits are equal, "tf_margins": the reference's margins on the disagreeing
      images, ascending (the MARGINS_KEPT largest), "max_tf_margin": the largest (None without
      disagreements), "margin_unit": "output steps" or "logits", "output_step": the step or None}.
    """
    differ = logits.argmax(1) != reference.argmax(1)
    reference_tied = _top_two_tied(reference)
    tied = reference_tied | _top_two_tied(logits)
    step = output_step(reference)
    margins = np.sort(_top_two_margin(reference[differ]) / (step or 1.0))
    return {"images": int(np.sum(differ)), "tied": int(np.sum(differ & tied)),
            "reference_ties": int(np.sum(reference_tied)),
            "tf_margins": [_rounded(m) for m in margins[-MARGINS_KEPT:]],
            "max_tf_margin": _rounded(margins[-1]) if len(margins) else None,
            "margin_unit": "output steps" if step else "logits", "output_step": step}
