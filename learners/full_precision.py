"""The full-precision learner: trains the float model and saves checkpoints under --save_path."""
import os

import tensorflow as tf

from learners import graphs, training
from learners.errors import UserError

tf1 = tf.compat.v1


class FullPrecLearner:
    """Trains and evaluates the float model of a ModelHelper."""

    name = "full-prec"

    def __init__(self, helper, settings):
        """helper: a ModelHelper; settings: the parsed flags (or any object with the same attributes)."""
        self.helper = helper
        self.settings = settings

    @property
    def save_path(self):
        return self.settings.save_path

    def train(self):
        """Train to the end of the schedule (resuming from the latest checkpoint if any); returns it."""
        s = self.settings
        model = graphs.build_graph(self.helper, True, momentum=s.momentum, seed=s.seed)
        with graphs.new_session(model.graph) as sess:
            sess.run(model.init_op)
            latest = training.latest_checkpoint(s.save_path)
            if latest:
                model.saver.restore(sess, latest)
                step = int(sess.run(model.global_step))
                if step >= model.nb_iters:
                    training.log("full-prec: found a finished float checkpoint %s (step %d); not retraining"
                                 % (latest, step))
                    return latest
                training.log("full-prec: resuming from %s at step %d of %d" % (latest, step, model.nb_iters))
            writer = tf1.summary.FileWriter(os.path.join(s.log_dir, self.name, "train"), model.graph)
            path = training.run_training(sess, model, s.save_path, writer, s.summ_step, s.save_step,
                                         s.batch_size, self.name)
            writer.close()
        training.log("full-prec: saved %s" % path)
        return path

    def evaluate(self, checkpoint=None):
        """Accuracy of a float checkpoint (default: the latest) on the whole test set."""
        checkpoint = checkpoint or training.latest_checkpoint(self.save_path)
        if checkpoint is None:
            raise UserError("no float checkpoint found in %s; expected one written by --learner full-prec"
                            % os.path.dirname(os.path.abspath(self.save_path)))
        return evaluate_checkpoint(self.helper, checkpoint, os.path.join(self.settings.log_dir, self.name, "eval"))


def evaluate_checkpoint(helper, checkpoint, log_dir, quant_config=None):
    """(accuracy, loss, examples) of `checkpoint` on the whole test set, written to TensorBoard too."""
    model = graphs.build_graph(helper, False, quant_config=quant_config)
    with graphs.new_session(model.graph) as sess:
        sess.run(model.init_op)
        variables = model.model_variables
        if quant_config is not None:
            variables = list(model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES))
        graphs.restore_variables(sess, variables, checkpoint)
        accuracy, loss, count = graphs.evaluate(sess, model)
        step = int(checkpoint.rsplit("-", 1)[1]) if checkpoint.rsplit("-", 1)[-1].isdigit() else 0
        writer = tf1.summary.FileWriter(log_dir)
        summary = tf1.Summary(value=[tf1.Summary.Value(tag="eval/accuracy", simple_value=accuracy),
                                     tf1.Summary.Value(tag="eval/loss", simple_value=loss)])
        writer.add_summary(summary, step)
        writer.close()
    return accuracy, loss, count
