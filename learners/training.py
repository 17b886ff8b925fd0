"""The training loop shared by the learners: progress lines, TensorBoard summaries, checkpoints, resuming."""
import os
import shutil
import sys
import time

import numpy as np
import tensorflow as tf

from learners import distributed, stopping, summaries
from learners.errors import UserError
from tfquant import checkpoints, files

tf1 = tf.compat.v1

KEEP_CHECKPOINTS = 3
DEFAULT_SAVE_SECS = 600.0


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


def find_checkpoint(save_path, name):
    """The newest readable checkpoint of the prefix save_path, falling back past damaged ones.

    Only checkpoints named like save_path (BASENAME-N) count, so learners may share a directory; the
    notes tfquant.checkpoints returns (fallbacks, an ignored state file) are printed here.
    Args:
      save_path: the checkpoint path prefix the learner saves under.
      name: the learner's name, shown in the note lines.
    Returns:
      (checkpoint prefix, its global step), or (None, 0) when the prefix has no checkpoint at all.
    Raises:
      UserError: checkpoints exist but none can be read (never start over silently).
    """
    try:
        checkpoint, step, notes = checkpoints.latest_valid_checkpoint(save_path)
    except checkpoints.CheckpointError as exc:
        raise UserError(str(exc)) from None
    for note in notes:
        log("%s: %s" % (name, note))
    return checkpoint, step


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


def save_checkpoint(sess, model, save_path, step, last_good, keep=KEEP_CHECKPOINTS):
    """Save a checkpoint at `step` after checking every variable is finite, then prune to `keep`.

    Args:
      sess, model: the training session and its ModelGraph.
      save_path: checkpoint prefix.
      step: the global step (the checkpoint is save_path-step).
      last_good: the newest good checkpoint so far (named in errors), or None.
      keep: how many checkpoints of save_path to keep, counting those of earlier runs.
    Returns:
      the saved checkpoint prefix.
    Raises:
      TrainingDiverged: a variable holds NaN or Inf (nothing is saved).
      UserError: the file system refused the save (full disk, read-only or unwritable directory).
    """
    save_path = os.path.abspath(save_path)  # what find_checkpoint returns too: one name per checkpoint
    _check_finite(sess, model, step, last_good)
    stopping.pause_point("save")
    checkpoint = "%s-%d" % (save_path, step)
    kept = ("the last good checkpoint %s is kept" % last_good) if last_good else "no checkpoint was saved before"
    try:
        os.makedirs(os.path.dirname(save_path), exist_ok=True)
        path = model.saver.save(sess, save_path, global_step=step, write_meta_graph=False)
    except (OSError, tf.errors.OpError) as exc:
        checkpoints.discard_partial_save(checkpoint)
        raise UserError("checkpoint %s cannot be saved (%s); expected a writable directory with free space; %s"
                        % (checkpoint, files.describe_error(exc), kept)) from None
    try:
        checkpoints.prune_checkpoints(save_path, keep, protect=[path])
    except OSError as exc:
        raise UserError("old checkpoint file %s cannot be deleted (%s); expected a writable directory"
                        % (exc.filename, files.error_cause(exc)[0])) from None
    return path


def run_training(sess, model, save_path, writer, summ_step, save_step, batch_size, name, last_good=None,
                 save_secs=DEFAULT_SAVE_SECS, cluster=None, sync_every_summ=False):
    """Train `model` from its current global step to model.nb_iters.

    Saves every save_step iterations, and whenever save_secs have passed since the last save, so a killed
    run loses little; on a stop request (SIGTERM/SIGINT) it saves at the current step and raises
    stopping.Stopped. Stops with TrainingDiverged at the first step whose loss is NaN or Inf, and never
    saves a checkpoint holding a non-finite variable, so the last good checkpoint stays the latest.
    Args:
      sess: session with variables initialised or restored.
      model: a training ModelGraph.
      save_path: checkpoint prefix.
      writer: a summaries.SummaryWriter (a write failure stops the run right after a save), or a tf1 FileWriter.
      summ_step: iterations between progress lines and summaries.
      save_step: iterations between checkpoints.
      batch_size: for images per second.
      name: shown in progress lines.
      last_good: the checkpoint the variables were restored from, if any (named if training diverges).
      save_secs: seconds after which a checkpoint is saved whatever save_step says.
      cluster: a distributed.Cluster, or None. Workers other than the chief neither save nor log (writer
        None); every worker compares its variables with the others' at the end (sync check).
      sync_every_summ: also run the sync check every summ_step iterations (--debug).
    Returns:
      the path of the final checkpoint (None on workers other than the chief).
    """
    chief = cluster is None or cluster.is_chief

    def run_step(fetches):
        if cluster is None:
            return sess.run(fetches)
        return distributed.run_collective(cluster, sess, fetches, when="at step %d" % (step + 1))

    step = int(sess.run(model.global_step))
    total = model.nb_iters
    if step >= total and last_good:
        return last_good
    saved_time = time.time()
    window_start, window_steps = time.time(), 0
    while step < total:
        if (step + 1) % summ_step == 0 or step + 1 == total:
            _, loss, accuracy, lrn_rate, summary = run_step(
                [model.train_op, model.loss, model.accuracy, model.lrn_rate, model.summary_op])
            step += 1
            window_steps += 1
            if chief:
                writer.add_summary(summary, step)
            if sync_every_summ and cluster is not None:
                check_sync(sess, model, cluster, step)
            if np.isfinite(loss) and chief:
                elapsed = time.time() - window_start
                per_step = elapsed / max(window_steps, 1)
                log("%s iter %d/%d | loss %.4f | acc %.4f | lr %.5f | %.0f img/s | remaining %s"
                    % (name, step, total, loss, accuracy, lrn_rate, batch_size / max(per_step, 1e-9),
                       _format_seconds(per_step * (total - step))))
            window_start, window_steps = time.time(), 0
        else:
            # The scalar loss comes with the step for free; it is the cheap divergence check.
            _, loss = run_step([model.train_op, model.loss])
            step += 1
            window_steps += 1
        if not np.isfinite(loss):
            if chief:
                writer.flush()
            raise TrainingDiverged(_diverged_message(step, "loss is %s" % ("nan" if np.isnan(loss) else "inf"),
                                                     last_good))
        due = step % save_step == 0 or time.time() - saved_time >= save_secs
        if not chief:
            stopping.check("at step %d" % step, "the chief saves the checkpoints")
        elif step < total and (due or stopping.requested() is not None):
            last_good = save_checkpoint(sess, model, save_path, step, last_good)
            saved_time = time.time()
            _check_writer(writer, last_good)
            # Also a signal that arrived during this save: the checkpoint just written is at this step.
            if stopping.requested() is not None:
                stopping.check("at step %d" % step, "saved %s" % last_good)
    path = None
    if chief:
        # The checkpoint first: a full disk under --log_dir must not cost the training.
        path = save_checkpoint(sess, model, save_path, step, last_good)
        _check_writer(writer, path)
    if cluster is not None:
        # After the chief's save: the other workers may read the final checkpoint once this returns.
        check_sync(sess, model, cluster, step)
    return path


def _check_writer(writer, saved):
    """Flush the summaries; when they cannot be written, stop with one line saying checkpoint `saved` is kept."""
    if writer is None or writer.flush() or not isinstance(writer, summaries.SummaryWriter):
        return
    raise writer.error("the checkpoint %s is saved" % saved)


def checkpoint_bytes(model):
    """About how many bytes one checkpoint of `model` takes: every saved variable's values."""
    total = 0
    for variable in model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES):
        shape = variable.shape
        if shape.is_fully_defined():
            total += int(np.prod(shape.as_list(), dtype=np.int64)) * max(variable.dtype.base_dtype.size, 1)
    return total


def warn_if_low_on_space(model, save_path):
    """Print a warning when the checkpoint directory has room for fewer than two more checkpoints."""
    directory = os.path.dirname(os.path.abspath(save_path))
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    needed = checkpoint_bytes(model)
    if free < 2 * needed:
        log("warning: %s has %.1f MiB free; a checkpoint takes about %.1f MiB, so fewer than two more fit "
            "(expected free space for at least two checkpoints)" % (directory, free / 2 ** 20, needed / 2 ** 20))


def check_sync(sess, model, cluster, step):
    """The workers compare a checksum of their variables; the chief says so when they agree."""
    model.extra["sync_check"].check(sess, sync_variables(model), "at step %d" % step)
    if cluster.is_chief:
        log("workers in sync at step %d" % step)


def sync_variables(model):
    """Every global variable of a training graph, in name order (the order every worker shares)."""
    return sorted(model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES), key=lambda v: v.op.name)


def train_with_summaries(sess, model, save_path, log_dir, settings, name, last_good=None, steps_per_epoch=None,
                         cluster=None):
    """run_training with a TensorBoard writer on `log_dir` (graph included), closed whatever happens.

    Args:
      settings: the parsed flags (summ_step, save_step, save_secs, batch_size).
      steps_per_epoch: iterations of one epoch; the checkpoint interval when --save_step is not set.
      Others as for run_training.
    Returns:
      the path of the final checkpoint.
    """
    save_step = settings.save_step or steps_per_epoch or model.nb_iters
    save_secs = getattr(settings, "save_secs", None) or DEFAULT_SAVE_SECS
    chief = cluster is None or cluster.is_chief
    writer = summaries.SummaryWriter(log_dir, model.graph) if chief else None
    if chief:
        warn_if_low_on_space(model, save_path)
    batch_size = settings.batch_size * (cluster.nb_workers if cluster is not None else 1)
    try:
        return run_training(sess, model, save_path, writer, settings.summ_step, max(int(save_step), 1),
                            batch_size, name, last_good=last_good, save_secs=save_secs, cluster=cluster,
                            sync_every_summ=bool(getattr(settings, "debug", False)))
    finally:
        if writer is not None:
            writer.close()
