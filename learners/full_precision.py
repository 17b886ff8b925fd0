"""The full-precision learner: trains the float model and saves checkpoints under --save_path."""
import os

import numpy as np
import tensorflow as tf

from learners import distributed, graphs, run_settings, summaries, training
from learners.errors import UserError
from tfquant import files

tf1 = tf.compat.v1


class FullPrecLearner:
    """Trains and evaluates the float model of a ModelHelper."""

    name = "full-prec"

    def __init__(self, helper, settings, cluster=None):
        """helper: a ModelHelper; settings: the parsed flags (or any object with the same attributes);
        cluster: a distributed.Cluster for multi-worker training (the helper already sharded), or None."""
        self.helper = helper
        self.settings = settings
        self.cluster = cluster

    @property
    def is_chief(self):
        """Whether this process writes files and evaluates (always, without a cluster)."""
        return self.cluster is None or self.cluster.is_chief

    @property
    def lrn_rate_scale(self):
        """PocketFlow's linear scaling by the number of workers, unless --enbl_lrn_rate_scaling is off."""
        if self.cluster is None or not getattr(self.settings, "enbl_lrn_rate_scaling", True):
            return 1.0
        return float(self.cluster.nb_workers)

    def start_session(self, model):
        """A session on model's graph with its variables initialised (all workers together on a cluster)."""
        sess = graphs.new_session(model.graph, self.cluster)
        if self.cluster is None:
            sess.run(model.init_op)
        else:
            distributed.run_collective(self.cluster, sess, model.init_op, when="at start-up")
        return sess

    @property
    def save_path(self):
        return self.settings.save_path

    def check_settings(self):
        """Refuse settings that differ from the record beside --save_path's checkpoints; returns the current ones."""
        current = run_settings.float_settings(self.helper, self.settings)
        save_path = self.settings.save_path
        adopt = bool(getattr(self.settings, "adopt_checkpoints", False))
        run_settings.refuse_changes(run_settings.changed_settings(save_path, current, adopt)[0], [save_path])
        return current

    def train(self, resume_from=None):
        """Train to the end of the schedule, resuming from the latest readable checkpoint if any.

        Args:
          resume_from: (checkpoint, global step) already chosen by training.find_checkpoint, or None
            to look in --save_path's directory.
        Returns:
          the final checkpoint path.
        """
        s = self.settings
        current = self.check_settings()
        latest, step = resume_from or training.find_checkpoint(s.save_path, self.name)
        if self.is_chief:
            run_settings.write_record(s.save_path, self.name, current)
        model = graphs.build_graph(self.helper, True, momentum=s.momentum, seed=s.seed, skip_batches=step,
                                   cluster=self.cluster, lrn_rate_scale=self.lrn_rate_scale)
        with self.start_session(model) as sess:
            if latest:
                graphs.restore_variables(sess, model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES), latest)
                step = int(sess.run(model.global_step))
                if step >= model.nb_iters:
                    training.log("full-prec: found a finished float checkpoint %s (step %d); not retraining"
                                 % (latest, step))
                    return latest
                training.log("full-prec: resuming from %s at step %d of %d" % (latest, step, model.nb_iters))
            if self.cluster is not None:
                training.check_sync(sess, model, self.cluster, step)
            path = training.train_with_summaries(sess, model, s.save_path, os.path.join(s.log_dir, self.name, "train"),
                                                 s, self.name, last_good=latest,
                                                 steps_per_epoch=getattr(self.helper, "nb_iters_per_epoch", None),
                                                 cluster=self.cluster)
        if path is None:
            # Another worker than the chief: the chief saved the final checkpoint in the shared directory.
            return training.find_checkpoint(s.save_path, self.name)[0]
        training.log("full-prec: saved %s" % path)
        return path

    def evaluate(self, checkpoint=None):
        """Accuracy of a float checkpoint (default: the latest) on the whole test set."""
        checkpoint = checkpoint or training.find_checkpoint(self.save_path, self.name)[0]
        if checkpoint is None:
            raise UserError("no float checkpoint found in %s; expected one written by --learner full-prec"
                            % os.path.dirname(os.path.abspath(self.save_path)))
        return evaluate_checkpoint(self.helper, checkpoint, os.path.join(self.settings.log_dir, self.name, "eval"))


class Evaluation(tuple):
    """(accuracy, loss, examples) of one evaluation, with `top5_accuracy` (None when the model has no top-5)."""

    def __new__(cls, accuracy, loss, count, top5_accuracy=None):
        evaluation = super().__new__(cls, (accuracy, loss, count))
        # An attribute, not a fourth element: every caller unpacks three.
        evaluation.top5_accuracy = top5_accuracy
        return evaluation


def evaluate_checkpoint(helper, checkpoint, log_dir, quant_config=None, check_report=None):
    """(accuracy, loss, examples) of `checkpoint` on the whole test set, written to TensorBoard too.

    Args:
      helper: a ModelHelper.
      checkpoint: checkpoint prefix.
      log_dir: TensorBoard directory of the eval summaries.
      quant_config: a tfquant.QuantConfig for a quantized checkpoint, None for a float one.
      check_report: optional function called with the rebuilt graph's QuantReport before restoring;
        raises UserError when the checkpoint's saved report belongs to another model.
    Returns:
      Evaluation: (accuracy, loss, number of examples) and its top5_accuracy.
    """
    model = graphs.build_graph(helper, False, quant_config=quant_config)
    if check_report is not None:
        check_report(model.report)
    if model.report is not None:
        check_activation_ranges(model.report, checkpoint)
    with graphs.new_session(model.graph) as sess:
        sess.run(model.init_op)
        variables = model.model_variables
        if quant_config is not None:
            variables = list(model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES))
        graphs.restore_variables(sess, variables, checkpoint)
        accuracy, loss, count = graphs.evaluate(sess, model, "checkpoint %s" % checkpoint)
        step = int(checkpoint.rsplit("-", 1)[1]) if checkpoint.rsplit("-", 1)[-1].isdigit() else 0
        writer = summaries.SummaryWriter(log_dir)
        values = [tf1.Summary.Value(tag="eval/accuracy", simple_value=accuracy),
                  tf1.Summary.Value(tag="eval/loss", simple_value=loss)]
        top5 = model.extra.get("eval_top5_accuracy")
        if top5 is not None:
            values.append(tf1.Summary.Value(tag="eval/top5_accuracy", simple_value=top5))
            training.log("evaluation of %s: top-1 accuracy %.4f | top-5 accuracy %.4f | %d test images"
                         % (checkpoint, accuracy, top5, count))
        summary = tf1.Summary(value=values)
        writer.add_summary(summary, step)
        writer.close()
    if writer.failure is not None:
        raise writer.error("checkpoint %s evaluated (accuracy %.4f on %d test images) but its evaluation is not "
                           "recorded" % (checkpoint, accuracy, count))
    return Evaluation(accuracy, loss, count, top5)


def check_activation_ranges(report, checkpoint):
    """Refuse a quantized checkpoint whose activation ranges are missing, non-finite or never recorded.

    Args:
      report: the QuantReport of the graph about to be restored.
      checkpoint: checkpoint prefix.
    Raises:
      UserError naming the first bad range variable.
    """
    try:
        reader = tf.train.load_checkpoint(checkpoint)
    except (tf.errors.OpError, ValueError) as exc:
        raise UserError("checkpoint %s cannot be read (%s); expected a TensorFlow checkpoint"
                        % (checkpoint, files.describe_error(exc))) from None
    stored = reader.get_variable_to_shape_map()
    for layer in report.activation_layers:
        if not layer.quantized or not layer.range_variables:
            continue
        values = {}
        for name in layer.range_variables:
            if name not in stored:
                raise UserError("checkpoint %s has no activation range %s of layer %s; expected a checkpoint "
                                "written by --learner uniform with these settings" % (checkpoint, name, layer.name))
            values[name.rsplit("/", 1)[-1]] = np.asarray(reader.get_tensor(name))
        low, high = values.get("ema_min"), values.get("ema_max")
        if low is None or high is None:
            continue
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(low <= high)):
            raise UserError("checkpoint %s: activation range of layer %s is [%s, %s]; expected finite min <= max"
                            % (checkpoint, layer.name, low, high))
        steps_name = layer.range_variables[0].rsplit("/", 1)[0] + "/ema_steps"
        if steps_name in stored and int(np.asarray(reader.get_tensor(steps_name)).max()) <= 0:
            raise UserError("checkpoint %s: the activation range of layer %s was never recorded (%s is 0); "
                            "expected a checkpoint of a finished quantized training" % (checkpoint, layer.name,
                                                                                       steps_name))
