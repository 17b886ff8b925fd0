"""The training loop shared by the learners: progress lines, TensorBoard summaries, checkpoints."""
import os
import sys
import time

import tensorflow as tf

tf1 = tf.compat.v1


def log(message):
    """One progress/status line on stdout."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _format_seconds(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dm%02ds" % (seconds // 60, seconds % 60)


def latest_checkpoint(save_path):
    """Latest checkpoint prefix in save_path's directory, or None."""
    return tf.train.latest_checkpoint(os.path.dirname(os.path.abspath(save_path)))


def run_training(sess, model, save_path, writer, summ_step, save_step, batch_size, name):
    """Train `model` from its current global step to model.nb_iters.

    Args:
      sess: session with variables initialised or restored.
      model: a training ModelGraph.
      save_path: checkpoint prefix; saved every save_step iterations and at the end.
      writer: a summary FileWriter.
      summ_step: iterations between progress lines and summaries.
      save_step: iterations between checkpoints.
      batch_size: for images per second.
      name: shown in progress lines.
    Returns:
      the path of the final checkpoint.
    """
    os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
    step = int(sess.run(model.global_step))
    total = model.nb_iters
    window_start, window_steps = time.time(), 0
    while step < total:
        if (step + 1) % summ_step == 0 or step + 1 == total:
            _, loss, accuracy, lrn_rate, summary = sess.run(
                [model.train_op, model.loss, model.accuracy, model.lrn_rate, model.summary_op])
            step += 1
            window_steps += 1
            writer.add_summary(summary, step)
            elapsed = time.time() - window_start
            per_step = elapsed / max(window_steps, 1)
            log("%s iter %d/%d | loss %.4f | acc %.4f | lr %.5f | %.0f img/s | remaining %s"
                % (name, step, total, loss, accuracy, lrn_rate, batch_size / max(per_step, 1e-9),
                   _format_seconds(per_step * (total - step))))
            window_start, window_steps = time.time(), 0
        else:
            sess.run(model.train_op)
            step += 1
            window_steps += 1
        if step % save_step == 0 and step < total:
            model.saver.save(sess, save_path, global_step=step)
    writer.flush()
    return model.saver.save(sess, save_path, global_step=step)
