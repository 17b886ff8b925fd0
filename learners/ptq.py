"""Post-training quantization: no training; activation ranges calibrated over a few training batches.

Weights are quantized as the uniform learner quantizes them (min/max per range group, computed in the graph).
Each quantized activation's range comes from a calibrator of tfquant.calibrate over the values it takes on
--uql_calib_batches training batches, with the weights already quantized and the activations float (as
pytorch_quantization calibrates). The ranges are written into the moving-average range variables of the
quantized evaluation graph, so the checkpoint, quant_report.json and results.json are those of a uniform run
and `--exec_mode eval` and `python -m tfquant.export` read them unchanged.
"""
import os
import time

import numpy as np
import tensorflow as tf

import tfquant
from learners import adaround_runner, graphs, training, uniform_quant
from learners.errors import UserError
from tfquant import calibrate, files

tf1 = tf.compat.v1


def weights_only(config):
    """The same QuantConfig with every activation left float (the graph calibration observes)."""
    settings = dict(config.to_dict(), activation_bits=32, activation_overrides=[])
    return tfquant.QuantConfig(**settings)


def _calibration_graph(helper, config, activation_names):
    """(graph, images tensor, observed tensors): training data through the eval-mode network, weights quantized."""
    graph = tf.Graph()
    with graph.as_default():
        images, _ = helper.build_dataset_train()
        helper.forward_eval(images)
        model_variables = list(tf1.global_variables())
        tfquant.quantize_graph(graph, weights_only(config), is_training=False)
        observed = [tfquant.match.integer_tensor(graph, name) for name in activation_names]
        saver = tf1.train.Saver(var_list=model_variables)
        extremes = [(tf.reduce_min(t), tf.reduce_max(t)) for t in observed]
    return graph, images, observed, extremes, saver, model_variables


def collect_histograms(helper, config, float_checkpoint, activation_names, nb_batches, num_bins=None):
    """Histograms of each named activation over nb_batches training batches.

    Two passes over the same batches (kept in memory): the first finds each tensor's extremes, which fix its
    histogram's bins; the second counts.
    Args:
      helper: a ModelHelper.
      config: the run's QuantConfig (its weight settings apply).
      float_checkpoint: checkpoint of the float model.
      activation_names: op names of the activations to observe.
      nb_batches: training batches to use.
      num_bins: bins per histogram (default calibrate.DEFAULT_BINS).
    Returns:
      {name: calibrate.RangeHistogram}.
    """
    graph, images, observed, extremes, _, model_variables = _calibration_graph(helper, config, activation_names)
    with graphs.new_session(graph) as sess:
        sess.run(tf1.global_variables_initializer())
        graphs.restore_variables(sess, model_variables, float_checkpoint)
        batches = [sess.run(images) for _ in range(nb_batches)]
        lows = np.full(len(observed), np.inf)
        highs = np.full(len(observed), -np.inf)
        for batch in batches:
            values = np.asarray(sess.run(extremes, feed_dict={images: batch}), np.float64).reshape(-1, 2)
            lows, highs = np.minimum(lows, values[:, 0]), np.maximum(highs, values[:, 1])
        bad = [name for name, lo, hi in zip(activation_names, lows, highs) if not (np.isfinite(lo) and np.isfinite(hi))]
        if bad:
            raise UserError("activation %s takes non-finite values on the calibration batches; expected a float "
                            "checkpoint that computes finite outputs" % bad[0])
        histograms = {name: calibrate.RangeHistogram(lo, hi, num_bins or calibrate.DEFAULT_BINS)
                      for name, lo, hi in zip(activation_names, lows, highs)}
        for batch in batches:
            for name, values in zip(activation_names, sess.run(observed, feed_dict={images: batch})):
                histograms[name].add(values)
    return histograms


class PTQLearner(uniform_quant.UniformQuantLearner):
    """Calibrates a float checkpoint's activation ranges and saves the quantized model, without training."""

    name = "ptq"

    def __init__(self, helper, settings, quant_config):
        """helper: a ModelHelper; settings: parsed flags (uql_calibrator, uql_calib_batches, ...)."""
        if quant_config.act_range != "ema":
            raise UserError("--uql_act_range=%s is not valid with --learner ptq; expected ema (calibrated ranges "
                            "are stored where the moving averages are)" % quant_config.act_range)
        super().__init__(helper, settings, quant_config)

    def train(self):
        """Calibrate, save checkpoint, report and results, evaluate; returns the results dict."""
        s = self.settings
        # Calibration starts from whatever float checkpoint --save_path holds: it must be this model's.
        self.float_learner.check_settings()
        float_checkpoint = self._float_checkpoint()
        float_evaluation = self.float_learner.evaluate(float_checkpoint)
        float_accuracy = float_evaluation[0]
        training.log("ptq: float model %s: test accuracy %.4f" % (float_checkpoint, float_accuracy))
        model = graphs.build_graph(self.helper, False, quant_config=self.config)
        report = model.report
        report.notes.extend(self.settings_notes)
        quantized = [layer for layer in report.activation_layers if layer.quantized and layer.range_variables]
        weights_checkpoint, extra = float_checkpoint, {}
        if getattr(s, "uql_adaround", False):
            # The rounded weights replace the float ones from here on: ranges are calibrated on them.
            weights_checkpoint, extra["adaround"] = adaround_runner.round_weights(
                self.helper, weights_only(self.config), float_checkpoint, s, self.output_dir)
            training.log("ptq: AdaRound rounded %d weight layers in %.1f s"
                         % (len(extra["adaround"]["layers"]), extra["adaround"]["seconds"]))
        started = time.time()
        histograms = collect_histograms(self.helper, self.config, weights_checkpoint,
                                        [layer.name for layer in quantized], s.uql_calib_batches)
        ranges = {}
        for layer in quantized:
            try:
                ranges[layer.name] = calibrate.calibrate_range(s.uql_calibrator, histograms[layer.name], layer.bits,
                                                               s.uql_calib_percentile)
            except calibrate.CalibrationError as exc:
                raise UserError("calibrating activation %s: %s" % (layer.name, exc))
        calib_seconds = time.time() - started
        training.log("ptq: calibrated %d activation ranges (%s) over %d batches of %d in %.1f s"
                     % (len(ranges), s.uql_calibrator, s.uql_calib_batches, s.batch_size, calib_seconds))
        os.makedirs(self.output_dir, exist_ok=True)
        report_path = os.path.join(self.output_dir, uniform_quant.REPORT_NAME)
        files.write_atomically(report_path, report.to_json())
        self._save_inference_graph()
        training.log(report.format_table())
        checkpoint = self._save(model, weights_checkpoint, quantized, ranges)
        extra.update({"calibrator": s.uql_calibrator, "calib_batches": s.uql_calib_batches,
                      "calib_seconds": calib_seconds,
                      "activation_ranges": {name: list(bounds) for name, bounds in ranges.items()}})
        return self._evaluate_and_report(float_checkpoint, float_accuracy, checkpoint, report, report_path, extra,
                                         float_top5=float_evaluation.top5_accuracy)

    def _save(self, model, weights_checkpoint, quantized, ranges):
        """Weights (float, or AdaRound's) plus calibrated ranges, saved as the checkpoint of step uql_calib_batches."""
        by_name = {v.op.name: v for v in model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)}
        with model.graph.as_default():
            assigns = []
            for layer in quantized:
                scope = layer.range_variables[0].rsplit("/", 1)[0]
                lo, hi = ranges[layer.name]
                assigns += [by_name[scope + "/ema_min"].assign(lo), by_name[scope + "/ema_max"].assign(hi),
                            by_name[scope + "/ema_steps"].assign(self.settings.uql_calib_batches)]
            assign_op = tf.group(assigns)
        with graphs.new_session(model.graph) as sess:
            sess.run(model.init_op)
            graphs.restore_variables(sess, model.model_variables, weights_checkpoint)
            sess.run(assign_op)
            return model.saver.save(sess, self.save_path, global_step=self.settings.uql_calib_batches,
                                    write_meta_graph=False)
