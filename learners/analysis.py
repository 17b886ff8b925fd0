"""What quantization did to a trained run: per-layer fidelity in the report (here), and the evaluation graph that it
and `--exec_mode analyze` (learners.layer_analysis) share.

Both use one evaluation graph of the quantized model whose every quantizer has an on/off switch
(tfquant.layer_switches): the float network, the quantized one and any mixture are the same graph with
other feeds, and a switch can also select the layer's quantizer at its suggested override's width: the
layer-by-layer analysis costs three evaluations per layer and no graph building beyond that one graph.
"""
import os
import re

import numpy as np
import tensorflow as tf

import tfquant
from learners import graphs, run_settings, training, uniform_quant
from learners.errors import UserError
from tfquant import checkpoints, fidelity, layer_switches, ranges, report_html, weight_grids
from tfquant.config import FLOAT_BITS
from tfquant.report_schema import layer_layout

tf1 = tf.compat.v1
ANALYSIS_NAME = "analysis.json"  # written by learners.layer_analysis, read by the HTML
FIDELITY_LOG = "fidelity"
# Offenders printed by --exec_mode analyze (analysis.json ranks them all).
TOP_OFFENDERS = 5
# Values fetched from the session per fidelity run (float32: 128 MB), so a large model takes fewer images at once.
FETCHED_VALUES = 32 * 1024 * 1024


class SwitchedModel:
    """The quantized evaluation graph on an image placeholder, a switch per quantized layer, variables restored.

    With `with_overrides`, every switched layer also gets an alternative (tfquant.layer_switches.insert_alternative):
    its own quantizer at the width the analysis's suggested override gives it, selected by `alternatives`.
    """

    def __init__(self, helper, config, checkpoint, input_shape, with_overrides=False):
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.images = tf1.placeholder(tf.float32, input_shape, name="images")
            logits = helper.forward_eval(self.images)
            self.report = tfquant.quantize_graph(self.graph, config, is_training=False)
            self.switches, (self.logits,) = layer_switches.insert_switches(
                self.graph, self.report, [self.report.output(logits)])
            trained = tf1.global_variables()
            # {switch placeholder: (width, its alternative's placeholder or None where that width is float)}
            self.alternatives = self._insert_alternatives(config) if with_overrides else {}
            # Grappler optimizes the graph once per feed signature; every run feeds every switch, so it runs once.
            self.sess = graphs.new_session(self.graph)
            graphs.restore_variables(self.sess, trained, checkpoint)
            # An alternative on a learned activation grid starts its own step (as an override run would).
            fresh = [v for v in tf1.global_variables() if all(v is not t for t in trained)]
            if fresh:
                self.sess.run(tf1.variables_initializer(fresh))

    def _insert_alternatives(self, config):
        layers = {layer.name: layer for layer in self.report.layers}
        alternatives = {}
        for record in self.switches:
            if record.switch in alternatives:
                continue  # a shared quantizer: one alternative
            bits = override_bits(record.bits)
            build = override_quantizer(layers[record.name], config, bits)
            alternatives[record.switch] = (
                bits, None if build is None else layer_switches.insert_alternative(record, build))
        return alternatives

    def close(self):
        self.sess.close()

    def weight_layouts(self):
        """{layer name: GroupLayout} of the quantized weight layers."""
        return {layer.name: layer_layout(layer) for layer in self.report.weight_layers if layer.quantized}

    def fidelity_chunk(self, limit):
        """Images per fidelity run: at most `limit`, and at most ~32 M values of the fetched tensors at once."""
        per_example = 0
        for record in self.switches:
            # Weights are fetched once, whole; per image: each activation's x and Q(x), each layer's output twice.
            tensors = [record.layer_output] * 2
            if record.kind == "activation":
                tensors += [record.float_tensor, record.quantized_tensor]
            for tensor in tensors:
                dims = tensor.shape.as_list()[1:] if tensor.shape.rank else []
                if all(d is not None for d in dims):
                    per_example += int(np.prod(dims, dtype=np.int64))
        return max(1, min(limit, FETCHED_VALUES // max(per_example, 1)))

    def feeds(self, images, chunk):
        """Feed dicts of the images, `chunk` at a time."""
        return [{self.images: images[i:i + chunk]} for i in range(0, len(images), chunk)]

    def measure(self, images, labels, quantized_names, chunk, at_override=None):
        """(top-1 accuracy, mean cross-entropy) with exactly the named layers quantized at their bits, and the
        switch `at_override` (if any) on its alternative: the layer at its override's width."""
        feed = layer_switches.switch_feed(self.switches, quantized_names)
        if at_override is not None:
            feed[self.alternatives[at_override][1]] = True
        correct, loss = 0, 0.0
        for i in range(0, len(images), chunk):
            logits = self.sess.run(self.logits, feed_dict={self.images: images[i:i + chunk], **feed})
            correct += int(np.sum(np.argmax(logits, -1) == labels[i:i + chunk]))
            loss += float(np.sum(cross_entropy(logits, labels[i:i + chunk])))
        return correct / len(images), loss / len(images)


def cross_entropy(logits, labels):
    """Softmax cross-entropy of each row of `logits` against its integer label, in float64."""
    logits = np.asarray(logits, np.float64).reshape(len(labels), -1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return np.log(np.sum(np.exp(shifted), axis=1)) - shifted[np.arange(len(labels)), np.asarray(labels, np.int64)]


def override_bits(bits):
    """The width the analysis suggests for a layer at `bits`: 8, or float for a layer at 8 or more."""
    return 8 if bits < 8 else FLOAT_BITS


def override_quantizer(layer, config, bits):
    """x -> x on the quantizer the layer's override (`bits`) gives it, or None where that is float or its grid
    cannot take `bits` (the measurement is then the layer kept float)."""
    if bits == FLOAT_BITS:
        return None
    if layer.kind == "weight":
        grid = weight_grids.for_layer(layer, config)
        fewest, most = grid.bit_range
        if not fewest <= bits <= most:
            return None
        layout = layer_layout(layer)
        # A learned grid starts from its initial steps at the new width, as a run with the override does.
        return lambda x: grid.initial_widths(x, [bits], layout)[bits]
    scope = "%s/%s" % (layer.name.replace(":", "/"), ranges.RANGE_SCOPE_SUFFIX)
    if config.act_range == "lsq":
        # LSQ's step is tied to its width: the override's grid starts from its own initial step (new variables).
        scope += "_override%d" % bits
    # Moving-average and PACT ranges do not depend on the width: the trained range is the override's.
    return lambda x: ranges.quantize_activation(x, bits, config.act_range, False, config.act_ema_decay, scope,
                                                layer.op_type, config.pact_decay,
                                                zero_exact=config.quantize_layer_outputs)[0]


def evaluation_arrays(helper, limit=None):
    """The helper's preprocessed evaluation images and labels (at most `limit`) as NumPy arrays."""
    return graphs.dataset_arrays(helper, evaluation=True, limit=limit)


def open_switched(helper, checkpoint, with_overrides=False):
    """(SwitchedModel of the checkpoint, its saved report, report path), the report checked against it."""
    report_path = os.path.join(os.path.dirname(checkpoint), uniform_quant.REPORT_NAME)
    saved, config = uniform_quant.read_report_and_config(report_path)
    uniform_quant.check_report_against_checkpoint(saved, checkpoint, report_path)
    return SwitchedModel(helper, config, checkpoint, _input_shape(helper), with_overrides), saved, report_path


def _input_shape(helper):
    with tf.Graph().as_default():
        images, _ = helper.build_dataset_eval()
    return [None] + images.shape.as_list()[1:]


def _step_of(checkpoint):
    match = re.search(r"-(\d+)$", checkpoint)
    return int(match.group(1)) if match else 0


def _write_summaries(log_dir, step, measured, switched, histograms):
    """TensorBoard: per-layer SQNR scalars; with `histograms`, each quantized weight and its codes."""
    with tf.Graph().as_default():  # the v1 writer needs graph mode
        writer = tf1.summary.FileWriter(log_dir)
    summary = tf1.Summary()
    for layer in measured["layers"]:
        tag = layer["name"].replace(":", "_")
        for field in ("sqnr_db", "output_sqnr_db"):
            if layer[field] is not None:
                summary.value.add(tag="%s/%s" % (field, tag), simple_value=layer[field])
    writer.add_summary(summary, step)
    if histograms:
        weights = [r for r in switched.switches if r.kind == "weight"]
        values = switched.sess.run([(r.float_tensor, r.quantized_tensor) for r in weights])
        layouts = switched.weight_layouts()
        for record, (x, q) in zip(weights, values):
            tag = record.weight_variable or record.name
            codes = _codes(q, layouts.get(record.name), record.bits)
            histogram = tf1.Summary()
            for name, data in (("weight/" + tag, x), ("codes/" + tag, codes)):
                histogram.value.add(tag=name, histo=_histogram_proto(data))
            writer.add_summary(histogram, step)
    writer.close()


def _codes(q, layout, bits):
    """Integer codes of quantized values: their level number counted from their range group's lowest level."""
    rows = fidelity.group_rows(q, layout) if layout is not None else [np.asarray(q).reshape(-1)]
    codes = []
    for row in rows:
        step = fidelity.grid_step(row, bits)
        codes.append(np.zeros(row.shape) if step is None else np.round((row - row.min()) / step))
    return np.concatenate(codes)


def _histogram_proto(values):
    values = np.asarray(values, np.float64).reshape(-1)
    counts, edges = np.histogram(values, bins=min(64, max(1, np.unique(values).size)))
    return tf1.HistogramProto(min=float(values.min()), max=float(values.max()), num=float(values.size),
                              sum=float(values.sum()), sum_squares=float(np.sum(values ** 2)),
                              bucket_limit=[float(e) for e in edges[1:]], bucket=[float(c) for c in counts])


def record_fidelity(helper, settings, checkpoint, learner_name):
    """Measure per-layer fidelity of a quantized checkpoint, add it to its quant_report.json, write the HTML.

    Args:
      helper: the run's ModelHelper (its evaluation images).
      settings: parsed flags (uql_analysis_batches, batch_size_eval, log_dir, uql_histograms).
      checkpoint: the quantized checkpoint prefix.
      learner_name: the learner's name (TensorBoard directory).
    Returns:
      the path of quant_report.html.
    """
    try:
        switched, saved, report_path = open_switched(helper, checkpoint)
    except (layer_switches.SwitchError, UserError) as exc:
        # The run itself is complete and saved (a resumed run that had nothing left to train may even hold a report
        # its checkpoint was not trained with): say what is missing rather than fail it.
        training.log("%s: per-layer fidelity not measured: %s" % (learner_name, exc))
        return write_html(os.path.dirname(checkpoint))
    try:
        images, _ = evaluation_arrays(helper, settings.uql_analysis_batches * settings.batch_size_eval)
        measured = fidelity.measure(switched.sess, switched.switches,
                                    switched.feeds(images, switched.fidelity_chunk(settings.batch_size_eval)),
                                    switched.logits, switched.weight_layouts())
        measured["examples"] = len(images)
        measured["batches"] = settings.uql_analysis_batches
        _write_summaries(os.path.join(settings.log_dir, learner_name, FIDELITY_LOG), _step_of(checkpoint),
                         measured, switched, getattr(settings, "uql_histograms", False))
    finally:
        switched.close()
    saved.fidelity = measured
    run_settings.write_json(report_path, saved.to_json(), "quantization report")
    return write_html(os.path.dirname(report_path))


def latest_checkpoint(learner):
    checkpoint = training.find_checkpoint(learner.save_path, learner.name)[0]
    if checkpoint is None:
        raise UserError("no quantized checkpoint found in %s; expected one written by --learner %s"
                        % (learner.output_dir, learner.name))
    return checkpoint


def record_latest_fidelity(helper, settings, learner):
    """record_fidelity on the learner's latest checkpoint, after learner.evaluate() (--exec_mode eval), which
    found it and printed any note about it already; returns the HTML path."""
    try:
        checkpoint = checkpoints.latest_valid_checkpoint(learner.save_path)[0]
    except checkpoints.CheckpointError as exc:
        raise UserError(str(exc)) from None
    if checkpoint is None:
        raise UserError("no quantized checkpoint found in %s; expected one written by --learner %s"
                        % (learner.output_dir, learner.name))
    return record_fidelity(helper, settings, checkpoint, learner.name)


def write_html(run_dir):
    """Render quant_report.html from the run directory's JSON files; UserError when they do not fit."""
    try:
        return report_html.write_report_html(run_dir)
    except tfquant.report.ReportError as exc:
        raise UserError(str(exc)) from None
