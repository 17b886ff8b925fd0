"""UniformQuantLearner: fine-tune a float model with tfquant's quantized forward pass, then save and report."""
import dataclasses
import math
import os

import tensorflow as tf

import tfquant
from learners import (bit_allocation, bn_reestimation, full_precision, graphs, progressive_bits, recipes, run_settings,
                      stopping, training)
from learners.errors import UserError
from tfquant import checkpoints
from tfquant.export import inference_graph
from tfquant.report import REPORT_NAME

tf1 = tf.compat.v1
RESULTS_NAME = "results.json"


class UniformQuantLearner:
    """Restores the float checkpoint, rewrites train and eval graphs with tfquant and fine-tunes."""

    name = "uniform"

    def __init__(self, helper, settings, quant_config, cluster=None):
        """helper: a ModelHelper; settings: parsed flags; quant_config: a tfquant.QuantConfig;
        cluster: a distributed.Cluster for multi-worker training (the helper already sharded), or None."""
        self.helper = helper
        self.settings = settings
        self.config = quant_config
        self.cluster = cluster
        self.float_learner = full_precision.FullPrecLearner(helper, settings, cluster)
        # Notes on settings the run script chose (learners.deployment_settings), kept in the report.
        self.settings_notes = []

    @property
    def save_path(self):
        return self.settings.uql_save_quant_model_path

    @property
    def output_dir(self):
        return os.path.dirname(os.path.abspath(self.save_path))

    def _input_shape(self):
        """[None, H, W, C] of the images the model reads, from the evaluation data set's static shape."""
        with tf.Graph().as_default():
            images, _ = self.helper.build_dataset_eval()
        return [None] + images.shape.as_list()[1:]

    def _save_inference_graph(self):
        """Save the float evaluation forward pass beside the report, so tfquant.export needs no model code."""
        inference_graph.save_inference_graph(self.output_dir, self.helper.forward_eval, self._input_shape())

    def _float_checkpoint(self):
        """A finished float checkpoint: the latest one, after training or finishing it when needed."""
        checkpoint, step = training.find_checkpoint(self.settings.save_path, self.float_learner.name)
        if checkpoint is None:
            training.log("uniform: no float checkpoint in %s; training one with the full-precision learner first"
                         % os.path.dirname(os.path.abspath(self.settings.save_path)))
            return self.float_learner.train(resume_from=(None, 0))
        nb_iters_train = getattr(self.helper, "nb_iters_train", None)
        if nb_iters_train is not None and step >= nb_iters_train():
            return checkpoint
        # A float run killed part-way: finish it (the full-precision learner says it resumes) first.
        return self.float_learner.train(resume_from=(checkpoint, step))

    def _check_settings(self):
        """Refuse changed settings of either phase; record this run's. Returns the recorded float checkpoint."""
        s = self.settings
        float_current = run_settings.float_settings(self.helper, s)
        quant_current = run_settings.quant_settings(self.helper, s)
        adopt = bool(getattr(s, "adopt_checkpoints", False))
        float_changes = run_settings.changed_settings(s.save_path, float_current, adopt)[0]
        quant_changes, record = run_settings.changed_settings(self.save_path, quant_current, adopt)
        places = [p for p, changes in ((s.save_path, float_changes), (self.save_path, quant_changes)) if changes]
        run_settings.refuse_changes(float_changes + quant_changes, places)
        resumable = record is not None and checkpoints.list_checkpoints(self.save_path)[0]
        started_from = record.get("float_checkpoint") if resumable else None
        if self.float_learner.is_chief:
            run_settings.write_record(self.save_path, self.name, quant_current, float_checkpoint=started_from)
        return quant_current, started_from

    def _record_float_checkpoint(self, quant_current, started_from, float_checkpoint, resuming):
        """Record which float checkpoint fine-tuning starts from; refuse resuming from another one."""
        # Relative to the quantized directory, so a run directory copied as a whole still matches.
        relative = os.path.relpath(os.path.abspath(float_checkpoint), self.output_dir)
        if resuming and started_from is not None and started_from != relative:
            run_settings.refuse_changes([("float_checkpoint", started_from, relative)], [self.save_path])
        if self.float_learner.is_chief:
            run_settings.write_record(self.save_path, self.name, quant_current, float_checkpoint=relative)

    def train(self):
        """Fine-tune, evaluate, save the checkpoint, report and results; returns the results dict."""
        s = self.settings
        quant_current, started_from = self._check_settings()
        bn_batches = getattr(s, "uql_bn_reestimate_batches", 0)
        if bn_batches:
            bn_reestimation.check_config(self.config, self.cluster)  # before training, not after it
        recipes.check_recipes(recipes.from_settings(s, 1, graphs.cosine_lrn_rate), self.config, self.cluster)
        float_checkpoint = self._float_checkpoint()
        stopping.pause_point("between_phases")
        stopping.check("between the float and quantized phases", "float checkpoint %s saved" % float_checkpoint)
        if self.cluster is None:
            float_evaluation = self._evaluate_float(float_checkpoint)
        batch_size = getattr(self.helper, "global_batch_size", s.batch_size)
        nb_iters = max(1, int(math.ceil(s.uql_quant_epochs * self.helper.n_train / batch_size)))
        latest, step = training.find_checkpoint(self.save_path, self.name)
        distillation = (s.loss_w_dst, s.tempr_dst) if getattr(s, "enbl_dst", False) else None
        self._record_float_checkpoint(quant_current, started_from, float_checkpoint, latest is not None)
        allocation = None
        if getattr(s, "uql_auto_bits", False):
            # Before the graph is built: the allocated bits become explicit_bits, which beat every other rule.
            self.config, allocation = bit_allocation.allocate(self.helper, s, self.config, float_checkpoint,
                                                              resuming=latest is not None)
        training_recipes = self._training_recipes(nb_iters)
        schedule = progressive_bits.schedule_for(s, nb_iters, self.cluster)

        def build(config, skip):
            return graphs.build_graph(self.helper, True, quant_config=config,
                                      lrn_rate_fn=graphs.cosine_lrn_rate(s.uql_lrn_rate_init, nb_iters),
                                      momentum=s.momentum, seed=s.seed, skip_batches=skip, distillation=distillation,
                                      cluster=self.cluster, lrn_rate_scale=self.float_learner.lrn_rate_scale,
                                      training_recipes=training_recipes)

        model = build(self.config, step)
        report = model.report
        report.allocation = allocation
        report.notes.extend(self.settings_notes)
        report_path = os.path.join(self.output_dir, REPORT_NAME)
        if self.float_learner.is_chief:
            stopping.pause_point("report")
            run_settings.write_json(report_path, report.to_json(), "quantization report")
            if self.cluster is None:
                self._save_inference_graph()
            stopping.check("after writing %s" % report_path, "saved checkpoints are kept")
            training.log(report.format_table())
        if getattr(report, "activation_path", None):
            training.log(report.activation_path)
        if schedule is not None and schedule.phase_of(step) < schedule.last:
            # The earlier phases first, each its own graph at its widths; the last is the graph built above.
            for phase in range(schedule.phase_of(step), schedule.last):
                phase_model = build(progressive_bits.phase_config(self.config, report, schedule.widths[phase]), step)
                phase_model.nb_iters = schedule.end(phase)
                training.log(progressive_bits.phase_line(schedule, phase))
                latest = self._train_phase(phase_model, float_checkpoint, latest, nb_iters,
                                           schedule.at_phase_start(step))[0]
                step = schedule.end(phase)
            model = build(self.config, step)
        if schedule is not None:
            training.log(progressive_bits.phase_line(schedule, schedule.last))
        checkpoint, extra = self._train_phase(model, float_checkpoint, latest, nb_iters,
                                              schedule is not None and schedule.at_phase_start(step),
                                              training_recipes=training_recipes, bn_batches=bn_batches)
        if schedule is not None:
            extra["progressive_bits"] = progressive_bits.results_entry(schedule)
        if not self.float_learner.is_chief:
            return None  # the chief evaluates and writes the results
        if self.cluster is not None:
            # Evaluated and saved after training on a cluster: the other workers would wait for them at their
            # first step, past the collective timeout on a busy machine.
            float_evaluation = self._evaluate_float(float_checkpoint)
            self._save_inference_graph()
        return self._evaluate_and_report(float_checkpoint, float_evaluation[0], checkpoint, report, report_path, extra,
                                         float_top5=float_evaluation.top5_accuracy)

    def _train_phase(self, model, float_checkpoint, latest, nb_iters, reset_ranges, training_recipes=None,
                     bn_batches=0):
        """Train `model` from `latest` (the float checkpoint when None) to model.nb_iters; the last phase (or the only
        one) also gathers the recipes' results and re-estimates batch norms.

        Args:
          reset_ranges: re-initialise the learned ranges first (a progressive phase's start, see progressive_bits).
        Returns:
          (the final checkpoint, the results.json entries of the recipes).
        """
        s = self.settings
        batch_size = getattr(self.helper, "global_batch_size", s.batch_size)
        teacher = model.extra.get("teacher_variables", {})
        reset = progressive_bits.reset_op(model.graph) if reset_ranges else None
        with self.float_learner.start_session(model) as sess:
            if teacher:
                # Frozen float teacher, from the float checkpoint on every start (checkpoints omit it).
                graphs.restore_variables(sess, teacher, float_checkpoint)
            if latest:
                teacher_names = {v.op.name for v in teacher.values()}
                # The decisions record is the current graph's (see graphs.build_graph), never the old checkpoint's.
                skipped = teacher_names | {tfquant.report.DECISIONS_VARIABLE}
                student = [v for v in model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)
                           if v.op.name not in skipped]
                graphs.restore_variables(sess, student, latest)
                training.log("uniform: resuming from %s at step %d of %d"
                             % (latest, sess.run(model.global_step), nb_iters))
            else:
                graphs.restore_variables(sess, model.model_variables, float_checkpoint)
            if reset is not None:
                sess.run(reset)
            if self.cluster is not None:
                training.check_sync(sess, model, self.cluster, int(sess.run(model.global_step)))
            checkpoint = training.train_with_summaries(
                sess, model, self.save_path, os.path.join(s.log_dir, self.name, "train"), s, self.name,
                last_good=latest, steps_per_epoch=max(1, self.helper.n_train // batch_size), cluster=self.cluster)
            if training_recipes is None:
                return checkpoint, {}
            extra = recipes.results_entries(sess, model, training_recipes)
            if bn_batches and checkpoint is not None:
                checkpoint, summary = bn_reestimation.reestimate_and_save(self.helper, self.config, sess, model,
                                                                          checkpoint, self.save_path, bn_batches)
                extra["bn_reestimation"] = summary
        return checkpoint, extra

    def _training_recipes(self, nb_iters):
        """The low-bit recipes the flags ask for, checked; a separate range optimizer drops PACT's decay too."""
        training_recipes = recipes.from_settings(self.settings, nb_iters, graphs.cosine_lrn_rate)
        recipes.check_recipes(training_recipes, self.config, self.cluster)
        if training_recipes.separate_ranges and self.config.pact_decay:
            self.config = dataclasses.replace(self.config, pact_decay=0.0)
        return training_recipes

    def _evaluate_and_report(self, float_checkpoint, float_accuracy, checkpoint, report, report_path, extra=None,
                             float_top5=None):
        """Evaluate the quantized checkpoint, write results.json (with `extra` entries) and print the summary."""
        s = self.settings
        evaluation = full_precision.evaluate_checkpoint(
            self.helper, checkpoint, os.path.join(s.log_dir, self.name, "eval"), self.config)
        quant_accuracy, _, count = evaluation
        results = {
            "model": self.helper.model_name, "dataset": self.helper.dataset_name,
            "float_checkpoint": float_checkpoint, "float_accuracy": float_accuracy,
            "quant_checkpoint": checkpoint, "quant_accuracy": quant_accuracy, "test_examples": count,
            "report": report_path, "log_dir": os.path.abspath(s.log_dir),
            "float_storage_bits": report.float_storage_bits, "quant_storage_bits": report.total_storage_bits,
            "compression_ratio": report.compression_ratio,
        }
        if evaluation.top5_accuracy is not None:
            # Models with many classes (ILSVRC-12) are judged by top-5 too; the float figure when it was measured.
            results["quant_top5_accuracy"] = evaluation.top5_accuracy
            if float_top5 is not None:
                results["float_top5_accuracy"] = float_top5
        stopping.pause_point("results")
        stopping.check("before writing the results", "saved checkpoints are kept")
        results.update(extra or {})
        run_settings.write_json(os.path.join(self.output_dir, RESULTS_NAME), results, "results file")
        from learners import analysis  # here: analysis imports this module
        html = analysis.record_fidelity(self.helper, s, checkpoint, self.name)
        for line in summary_lines(results) + recipes.summary_lines(results) + ["report page: %s" % html]:
            training.log(line)
        return results

    def _evaluate_float(self, float_checkpoint):
        """The float checkpoint's Evaluation (accuracy, loss, examples; top5_accuracy)."""
        evaluation = self.float_learner.evaluate(float_checkpoint)
        training.log("uniform: float model %s: test accuracy %.4f" % (float_checkpoint, evaluation[0]))
        return evaluation

    def evaluate(self, checkpoint=None):
        """Accuracy of the latest quantized checkpoint, rebuilt with the config saved in its report."""
        checkpoint = checkpoint or training.find_checkpoint(self.save_path, self.name)[0]
        if checkpoint is None:
            raise UserError("no quantized checkpoint found in %s; expected one written by --learner uniform"
                            % self.output_dir)
        report_path = os.path.join(os.path.dirname(checkpoint), REPORT_NAME)
        saved, config = read_report_and_config(report_path)
        check_report_against_checkpoint(saved, checkpoint, report_path)
        return full_precision.evaluate_checkpoint(
            self.helper, checkpoint, os.path.join(self.settings.log_dir, self.name, "eval"), config,
            check_report=lambda rebuilt: check_report_matches(saved, rebuilt, report_path))


def read_report_and_config(report_path):
    """(QuantReport, QuantConfig replaying its recorded decisions); UserError when missing or malformed.

    The config takes each layer's bits from the report by exact op name, so no override pattern stored in
    the file is ever compiled or run (a crafted pattern could otherwise take exponential time).
    """
    try:
        report = tfquant.report.read_report(report_path)
        return report, tfquant.report.config_from_report(report)
    except tfquant.report.ReportError as exc:
        raise UserError("%s; expected the %s written by training" % (exc, REPORT_NAME))


def check_report_against_checkpoint(saved, checkpoint, report_path):
    """Refuse a report whose per-layer decisions differ from those the checkpoint was trained with."""
    try:
        recorded = tf.train.load_checkpoint(checkpoint).get_tensor(tfquant.report.DECISIONS_VARIABLE)
    except (tf.errors.OpError, ValueError) as exc:
        raise UserError("checkpoint %s holds no record of its quantization decisions (%s); expected a checkpoint "
                        "written by --learner uniform" % (checkpoint, str(exc).splitlines()[0] if str(exc) else
                                                          type(exc).__name__))
    recorded = recorded.decode("utf-8", "replace") if isinstance(recorded, bytes) else str(recorded)
    difference = tfquant.report.decisions_difference(recorded, saved)
    if difference:
        raise UserError("quantization report %s does not match this checkpoint's model: %s; expected the report "
                        "written with checkpoint %s" % (report_path, difference, checkpoint))


def check_report_matches(saved, rebuilt, report_path):
    """Refuse a saved report whose weight layers (variable names, shapes) differ from the rebuilt model's.

    Args:
      saved: the QuantReport read from report_path.
      rebuilt: the QuantReport of the graph rebuilt for this model.
      report_path: shown in the message.
    Raises:
      UserError naming the first difference.
    """
    def layers(report):
        return [(layer.weight_variable, layer.shape) for layer in report.weight_layers]

    ours, theirs = layers(rebuilt), layers(saved)
    for index, (want, got) in enumerate(zip(ours, theirs)):
        if want != got:
            raise UserError("quantization report %s is from another model: weight layer %d is %s with shape %s in "
                            "the report, %s with shape %s in this model; expected the report written with this "
                            "checkpoint" % (report_path, index, got[0], got[1], want[0], want[1]))
    if len(ours) != len(theirs):
        extra = (theirs if len(theirs) > len(ours) else ours)[min(len(ours), len(theirs))][0]
        raise UserError("quantization report %s is from another model: it lists %d weight layers, this model has "
                        "%d (first unmatched: %s); expected the report written with this checkpoint"
                        % (report_path, len(theirs), len(ours), extra))
    _check_layer_decisions(saved, rebuilt, report_path)


def _check_layer_decisions(saved, rebuilt, report_path):
    """Refuse a saved report whose per-layer bits, range groups or activation ranges differ from the rebuilt one."""
    unmatched = tfquant.report.unmatched_layers(saved, rebuilt)
    if unmatched:
        raise UserError("quantization report %s does not match this checkpoint's model: %s; expected the report "
                        "written with this checkpoint" % (report_path, unmatched))
    if len(rebuilt.layers) != len(saved.layers):
        raise UserError("quantization report %s does not match this checkpoint's model: it lists %d layers "
                        "(weights and activations), the model rebuilt from it has %d; expected the report written "
                        "with this checkpoint" % (report_path, len(saved.layers), len(rebuilt.layers)))
    difference = tfquant.report.layer_difference(saved, rebuilt)
    if difference is not None:
        index, name, field, saved_value, rebuilt_value = difference
        raise UserError("quantization report %s does not match this checkpoint's model: layer %d (%s) has %s %s in "
                        "the report, %s in the model rebuilt from its settings; expected the report written with "
                        "this checkpoint" % (report_path, index, name, field, saved_value, rebuilt_value))


def summary_lines(results):
    """The final lines a uniform run prints."""
    return [
        "float accuracy:     %.4f  (%s)" % (results["float_accuracy"], results["float_checkpoint"]),
        "quantized accuracy: %.4f  on %d test images (%s)" % (results["quant_accuracy"], results["test_examples"],
                                                             results["quant_checkpoint"]),
        "model size: float %d bits (%.1f KiB), quantized %d bits (%.1f KiB), ratio %.2fx"
        % (results["float_storage_bits"], results["float_storage_bits"] / 8192.0, results["quant_storage_bits"],
           results["quant_storage_bits"] / 8192.0, results["compression_ratio"]),
        "report: %s" % results["report"],
        "TensorBoard: tensorboard --logdir %s" % results["log_dir"],
    ]
