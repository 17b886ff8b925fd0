"""The training loop shared by the learners: progress lines, TensorBoard summaries, checkpoints, resuming."""
import glob
import os
import re
import sys
import time

import numpy as np
import tensorflow as tf

from learners.errors import UserError

tf1 = tf.compat.v1

# What reading a damaged checkpoint raises: TF errors, and IndexError for a truncated data file.
_READ_ERRORS = (tf.errors.OpError, OSError, ValueError, IndexError, RuntimeError)


class TrainingDiverged(UserError):
    """The loss or a variable became NaN or Inf; the last good checkpoint is left as it was."""


def log(message):
    """One progress/status line on stdout."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _format_seconds(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dm%02ds" % (seconds // 60, seconds % 60)


def _step_of(prefix):
    match = re.search(r"-(\d+)$", prefix)
    return int(match.group(1)) if match else -1


def checkpoint_candidates(save_path):
    """Checkpoint prefixes of save_path's directory, newest first.

    The checkpoint state file decides; when it is missing or lists nothing, the index files on disk do,
    so a damaged state file cannot make a run start from scratch.
    Args:
      save_path: the checkpoint path prefix the learner saves under.
    Returns:
      a list of prefixes.
    """
    directory = os.path.dirname(os.path.abspath(save_path))
    prefixes = []
    state = tf.train.get_checkpoint_state(directory)
    if state is not None:
        prefixes = [state.model_checkpoint_path] + list(reversed(state.all_model_checkpoint_paths))
    if not [p for p in prefixes if p]:
        pattern = os.path.join(directory, glob.escape(os.path.basename(save_path)) + "-*.index")
        prefixes = sorted((p[:-len(".index")] for p in glob.glob(pattern)), key=_step_of, reverse=True)
    unique = []
    for prefix in prefixes:
        if prefix and prefix not in unique:
            unique.append(prefix)
    return unique


def _read_step(prefix):
    """Read every tensor of a checkpoint (so a truncated or corrupt file fails here); returns global_step."""
    reader = tf.train.load_checkpoint(prefix)
    step = 0
    for name in sorted(reader.get_variable_to_shape_map()):
        value = np.asarray(reader.get_tensor(name))
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise ValueError("variable %s holds non-finite values" % name)
        if name == "global_step":
            step = int(value)
    return step


def find_checkpoint(save_path, name):
    """The newest readable checkpoint under save_path's directory, falling back past damaged ones.

    Args:
      save_path: the checkpoint path prefix the learner saves under.
      name: the learner's name, shown in the fallback lines.
    Returns:
      (checkpoint prefix, its global step), or (None, 0) when the directory has no checkpoint at all.
    Raises:
      UserError: checkpoints exist but none can be read (never start over silently).
    """
    candidates = checkpoint_candidates(save_path)
    problems = []
    for position, prefix in enumerate(candidates):
        try:
            step = _read_step(prefix)
        except _READ_ERRORS as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problems.append("%s (%s)" % (prefix, reason))
            if position + 1 < len(candidates):
                log("%s: checkpoint %s cannot be restored (%s); falling back to the previous one %s"
                    % (name, prefix, reason, candidates[position + 1]))
            continue
        return prefix, step
    if problems:
        raise UserError("no checkpoint under %s can be restored: %s; expected a readable checkpoint (move the "
                        "directory away to start from scratch)"
                        % (os.path.dirname(os.path.abspath(save_path)), "; ".join(problems)))
    return None, 0


def _check_finite(sess, model, step, last_good):
    """Raise TrainingDiverged naming the first variable (by name) that holds NaN or Inf."""
    flags = sess.run(model.finite_flags)
    if np.all(flags):
        return
    name = model.checked_variable_names[int(np.argmin(flags))]
    variable = [v for v in model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES) if v.op.name == name][0]
    value = sess.run(variable)
    kind = "nan" if np.any(np.isnan(value)) else "inf"
    raise TrainingDiverged(_diverged_message(step, "variable %s holds %s values" % (name, kind), last_good))


def _diverged_message(step, what, last_good):
    kept = ("the last good checkpoint %s is kept" % last_good) if last_good else "no checkpoint was saved"
    return "training diverged at step %d: %s; %s" % (step, what, kept)


def run_training(sess, model, save_path, writer, summ_step, save_step, batch_size, name, last_good=None):
    """Train `model` from its current global step to model.nb_iters.

    Stops with TrainingDiverged at the first step whose loss is NaN or Inf, and never saves a checkpoint
    holding a non-finite variable, so the last good checkpoint stays the latest.
    Args:
      sess: session with variables initialised or restored.
      model: a training ModelGraph.
      save_path: checkpoint prefix; saved every save_step iterations and at the end.
      writer: a summary FileWriter.
      summ_step: iterations between progress lines and summaries.
      save_step: iterations between checkpoints.
      batch_size: for images per second.
      name: shown in progress lines.
      last_good: the checkpoint the variables were restored from, if any (named if training diverges).
    Returns:
      the path of the final checkpoint.
    """
    os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
    step = int(sess.run(model.global_step))
    total = model.nb_iters
    if step >= total and last_good:
        return last_good
    window_start, window_steps = time.time(), 0
    while step < total:
        if (step + 1) % summ_step == 0 or step + 1 == total:
            _, loss, accuracy, lrn_rate, summary = sess.run(
                [model.train_op, model.loss, model.accuracy, model.lrn_rate, model.summary_op])
            step += 1
            window_steps += 1
            writer.add_summary(summary, step)
            if np.isfinite(loss):
                elapsed = time.time() - window_start
                per_step = elapsed / max(window_steps, 1)
                log("%s iter %d/%d | loss %.4f | acc %.4f | lr %.5f | %.0f img/s | remaining %s"
                    % (name, step, total, loss, accuracy, lrn_rate, batch_size / max(per_step, 1e-9),
                       _format_seconds(per_step * (total - step))))
            window_start, window_steps = time.time(), 0
        else:
            # The scalar loss comes with the step for free; it is the cheap divergence check.
            _, loss = sess.run([model.train_op, model.loss])
            step += 1
            window_steps += 1
        if not np.isfinite(loss):
            writer.flush()
            raise TrainingDiverged(_diverged_message(step, "loss is %s" % ("nan" if np.isnan(loss) else "inf"),
                                                     last_good))
        if step % save_step == 0 and step < total:
            _check_finite(sess, model, step, last_good)
            last_good = model.saver.save(sess, save_path, global_step=step, write_meta_graph=False)
    writer.flush()
    _check_finite(sess, model, step, last_good)
    return model.saver.save(sess, save_path, global_step=step, write_meta_graph=False)


def train_with_summaries(sess, model, save_path, log_dir, settings, name, last_good=None):
    """run_training with a TensorBoard writer on `log_dir` (graph included), closed whatever happens.

    Args:
      settings: the parsed flags (summ_step, save_step, batch_size).
      Others as for run_training.
    Returns:
      the path of the final checkpoint.
    """
    writer = tf1.summary.FileWriter(log_dir, model.graph)
    try:
        return run_training(sess, model, save_path, writer, settings.summ_step, settings.save_step,
                            settings.batch_size, name, last_good=last_good)
    finally:
        writer.close()
