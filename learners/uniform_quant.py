"""UniformQuantLearner: fine-tune a float model with tfquant's quantized forward pass, then save and report."""
import json
import math
import os

import tensorflow as tf

import tfquant
from learners import full_precision, graphs, training
from learners.errors import UserError

tf1 = tf.compat.v1
REPORT_NAME = "quant_report.json"
RESULTS_NAME = "results.json"


def _write_json_atomically(path, data):
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        handle.write(data if isinstance(data, str) else json.dumps(data, indent=2))
    os.replace(temporary, path)


class UniformQuantLearner:
    """Restores the float checkpoint, rewrites train and eval graphs with tfquant and fine-tunes."""

    name = "uniform"

    def __init__(self, helper, settings, quant_config):
        """helper: a ModelHelper; settings: parsed flags; quant_config: a tfquant.QuantConfig."""
        self.helper = helper
        self.settings = settings
        self.config = quant_config
        self.float_learner = full_precision.FullPrecLearner(helper, settings)

    @property
    def save_path(self):
        return self.settings.uql_save_quant_model_path

    @property
    def output_dir(self):
        return os.path.dirname(os.path.abspath(self.save_path))

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

    def train(self):
        """Fine-tune, evaluate, save the checkpoint, report and results; returns the results dict."""
        s = self.settings
        float_checkpoint = self._float_checkpoint()
        float_accuracy, _, _ = self.float_learner.evaluate(float_checkpoint)
        training.log("uniform: float model %s: test accuracy %.4f" % (float_checkpoint, float_accuracy))
        nb_iters = max(1, int(math.ceil(s.uql_quant_epochs * self.helper.n_train / s.batch_size)))
        latest, step = training.find_checkpoint(self.save_path, self.name)
        model = graphs.build_graph(self.helper, True, quant_config=self.config,
                                   lrn_rate_fn=graphs.cosine_lrn_rate(s.uql_lrn_rate_init, nb_iters),
                                   momentum=s.momentum, seed=s.seed, skip_batches=step)
        report = model.report
        os.makedirs(self.output_dir, exist_ok=True)
        report_path = os.path.join(self.output_dir, REPORT_NAME)
        _write_json_atomically(report_path, report.to_json())
        training.log(report.format_table())
        with graphs.new_session(model.graph) as sess:
            sess.run(model.init_op)
            if latest:
                graphs.restore_variables(sess, list(model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)),
                                         latest)
                training.log("uniform: resuming from %s at step %d of %d"
                             % (latest, sess.run(model.global_step), nb_iters))
            else:
                graphs.restore_variables(sess, model.model_variables, float_checkpoint)
            checkpoint = training.train_with_summaries(sess, model, self.save_path,
                                                       os.path.join(s.log_dir, self.name, "train"), s, self.name,
                                                       last_good=latest)
        return self._evaluate_and_report(float_checkpoint, float_accuracy, checkpoint, report, report_path)

    def _evaluate_and_report(self, float_checkpoint, float_accuracy, checkpoint, report, report_path, extra=None):
        """Evaluate the quantized checkpoint, write results.json (with `extra` entries) and print the summary."""
        s = self.settings
        quant_accuracy, _, count = full_precision.evaluate_checkpoint(
            self.helper, checkpoint, os.path.join(s.log_dir, self.name, "eval"), self.config)
        results = {
            "model": self.helper.model_name, "dataset": self.helper.dataset_name,
            "float_checkpoint": float_checkpoint, "float_accuracy": float_accuracy,
            "quant_checkpoint": checkpoint, "quant_accuracy": quant_accuracy, "test_examples": count,
            "report": report_path, "log_dir": os.path.abspath(s.log_dir),
            "float_storage_bits": report.float_storage_bits, "quant_storage_bits": report.total_storage_bits,
            "compression_ratio": report.compression_ratio,
        }
        results.update(extra or {})
        _write_json_atomically(os.path.join(self.output_dir, RESULTS_NAME), results)
        for line in summary_lines(results):
            training.log(line)
        return results

    def evaluate(self, checkpoint=None):
        """Accuracy of the latest quantized checkpoint, rebuilt with the config saved in its report."""
        checkpoint = checkpoint or training.find_checkpoint(self.save_path, self.name)[0]
        if checkpoint is None:
            raise UserError("no quantized checkpoint found in %s; expected one written by --learner uniform"
                            % self.output_dir)
        report_path = os.path.join(os.path.dirname(checkpoint), REPORT_NAME)
        saved, config = load_report(report_path)
        return full_precision.evaluate_checkpoint(
            self.helper, checkpoint, os.path.join(self.settings.log_dir, self.name, "eval"), config,
            check_report=lambda rebuilt: check_report_matches(saved, rebuilt, report_path))


def load_report(report_path):
    """(QuantReport, QuantConfig) recorded in a report JSON; UserError when missing or malformed."""
    try:
        with open(report_path) as handle:
            report = tfquant.QuantReport.from_json(handle.read())
        return report, tfquant.QuantConfig(**report.config)
    except OSError as exc:
        raise UserError("quantization report %s cannot be read (%s); expected the %s written by training"
                        % (report_path, exc.strerror, REPORT_NAME))
    except (ValueError, TypeError) as exc:
        raise UserError("quantization report %s: %s" % (report_path, exc))


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
