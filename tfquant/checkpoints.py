"""Finding, validating and pruning the checkpoints of one checkpoint prefix (DIR/BASENAME-N).

A directory may hold the checkpoints of several learners (`float.ckpt-N` and `quant.ckpt-N`), and
TensorFlow's `checkpoint` state file names only whichever learner saved last, possibly with absolute
paths into another directory (a run directory copied elsewhere). So the state file is advisory:
discovery takes the `BASENAME-N.index` files on disk (the state file's entries are resolved inside the
directory being read, and one whose files exist is on disk anyway), keeps only this prefix's own, and
orders by step. Everything
here is a pure function of the files; problems a caller should show are returned as notes.
"""
import os
import re

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
# TensorFlow's own message for the state file; its text format is what Saver writes.
from tensorflow.python.training import checkpoint_state_pb2

from tfquant import files
from tfquant.errors import TfquantError

STATE_FILE_NAME = "checkpoint"
# TensorFlow's state file names a few dozen checkpoints at most; anything bigger is not one.
STATE_FILE_LIMIT = 1024 * 1024
_DATA_SHARD = re.compile(r"\.data-\d{5}-of-\d{5}$")


class CheckpointError(TfquantError, ValueError):
    """A checkpoint (or every checkpoint of a prefix) cannot be used; `path` names it."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


def _split_prefix(prefix):
    """(absolute directory, basename) of a checkpoint prefix such as models/model.ckpt."""
    absolute = os.path.abspath(os.fspath(prefix))
    return os.path.dirname(absolute), os.path.basename(absolute)


def _list_directory(directory):
    try:
        return os.listdir(directory)
    except OSError as exc:
        raise CheckpointError("checkpoint directory %s cannot be listed (%s)" % (directory, exc.strerror or exc),
                              directory) from None


def step_of(prefix, basename=None):
    """The N of a prefix BASENAME-N (any basename when None), or None when it has no step suffix."""
    name = os.path.basename(os.fspath(prefix))
    stem, dash, digits = name.rpartition("-")
    if not dash or not digits.isdigit() or (basename is not None and stem != basename):
        return None
    return int(digits)


def read_state_file(directory):
    """The checkpoint names listed in `directory`'s `checkpoint` state file, resolved inside `directory`.

    Only entries that lie in `directory` itself count, by their basename: a relative name, or a path
    (absolute or relative) whose directory is this one. Entries pointing anywhere else (another
    directory, `../`) are ignored with a note, so a copied run directory never reads the original.
    Args:
      directory: the directory to read.
    Returns:
      (list of basenames such as 'model.ckpt-20' in file order, list of note strings).
    """
    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, STATE_FILE_NAME)
    if not os.path.lexists(path):
        return [], []
    try:
        text = files.read_text(path, CheckpointError, "checkpoint state file", STATE_FILE_LIMIT)
    except CheckpointError as exc:
        return [], ["%s; using the checkpoint files on disk" % exc]
    state = checkpoint_state_pb2.CheckpointState()
    try:
        text_format.Parse(text, state)
    except text_format.ParseError as exc:
        return [], ["checkpoint state file %s is not valid (%s); using the checkpoint files on disk"
                    % (path, " ".join(str(exc).split())[:200])]
    names, notes, outside = [], [], []
    for entry in [state.model_checkpoint_path] + list(state.all_model_checkpoint_paths):
        if not entry or "\0" in entry:
            continue
        resolved = os.path.normpath(os.path.join(directory, entry))
        if os.path.dirname(resolved) != directory:
            if entry not in outside:
                outside.append(entry)
            continue
        name = os.path.basename(resolved)
        if name not in names:
            names.append(name)
    if outside:
        notes.append("checkpoint state file %s names %d path(s) outside its directory (first: %s); ignored, "
                     "using the checkpoints in %s" % (path, len(outside), outside[0], directory))
    return names, notes


def list_checkpoints(prefix):
    """Every checkpoint of `prefix` (DIR/BASENAME) on disk, newest first, with notes on the state file.

    Args:
      prefix: the checkpoint path prefix a learner saves under (without the -N step suffix).
    Returns:
      (list of checkpoint prefixes DIR/BASENAME-N ordered by descending N, list of note strings).
    """
    directory, basename = _split_prefix(prefix)
    names, notes = read_state_file(directory)
    entries = _list_directory(directory) if os.path.lexists(directory) else []
    steps = {step_of(entry[:-len(".index")], basename) for entry in entries if entry.endswith(".index")} - {None}
    # Entries whose files are gone (deleted, pruned, never copied) are not checkpoints; only a newer one
    # than any on disk is worth a note, since the run will not continue from where the state file says.
    missing = sorted({step_of(name, basename) for name in names} - {None} - steps)
    if missing and (not steps or missing[-1] > max(steps)):
        notes.append("checkpoint state file in %s names %s-%d, whose files are missing; using the checkpoints on "
                     "disk" % (directory, basename, missing[-1]))
    return [os.path.join(directory, "%s-%d" % (basename, step)) for step in sorted(steps, reverse=True)], notes


def checkpoint_files(checkpoint):
    """The files of one checkpoint DIR/BASENAME-N: its .index and .data-* shards that exist."""
    directory, name = _split_prefix(checkpoint)
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, entry) for entry in sorted(entries)
            if entry == name + ".index" or (entry.startswith(name + ".data-")
                                            and _DATA_SHARD.search(entry[len(name):]))]


def validate_checkpoint(checkpoint):
    """Read every tensor of a checkpoint: its files must be regular, complete and its floats finite.

    Args:
      checkpoint: a checkpoint prefix DIR/BASENAME-N.
    Returns:
      its global_step (0 when it has none).
    Raises:
      CheckpointError naming the checkpoint and the first problem.
    """
    checkpoint = os.path.abspath(os.fspath(checkpoint))
    index = checkpoint + ".index"
    # TensorFlow's reader would block on a FIFO and read a device without end; refuse both first.
    files.regular_file_size(index, CheckpointError, "checkpoint index")
    for path in checkpoint_files(checkpoint):
        files.regular_file_size(path, CheckpointError, "checkpoint file")
    try:
        reader = tf.train.load_checkpoint(checkpoint)
        step = 0
        for name in sorted(reader.get_variable_to_shape_map()):
            value = np.asarray(reader.get_tensor(name))
            if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
                raise CheckpointError("variable %s holds non-finite values" % name, checkpoint)
            if name == "global_step":
                step = int(value)
    except CheckpointError:
        raise
    except (tf.errors.OpError, OSError, ValueError, IndexError, RuntimeError, TypeError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(text[:300], checkpoint) from None
    return step


def latest_valid_checkpoint(prefix):
    """The newest checkpoint of `prefix` that validates, falling back past damaged ones.

    Args:
      prefix: the checkpoint path prefix (DIR/BASENAME).
    Returns:
      (checkpoint prefix or None when the prefix has no checkpoint at all, its global step, notes).
    Raises:
      CheckpointError: checkpoints exist but none is readable (a caller must never start over silently).
    """
    candidates, notes = list_checkpoints(prefix)
    problems = []
    for position, candidate in enumerate(candidates):
        try:
            step = validate_checkpoint(candidate)
        except CheckpointError as exc:
            problems.append("%s (%s)" % (candidate, exc))
            if position + 1 < len(candidates):
                notes.append("checkpoint %s cannot be restored (%s); falling back to the previous one %s"
                             % (candidate, exc, candidates[position + 1]))
            continue
        return candidate, step, notes
    if problems:
        directory = _split_prefix(prefix)[0]
        raise CheckpointError("no checkpoint of %s can be restored: %s; expected a readable checkpoint (move the "
                              "directory away to start from scratch)" % (prefix, "; ".join(problems)), directory)
    return None, 0, notes


def latest_in_directory(directory):
    """The newest checkpoint in a directory that holds the checkpoints of exactly one prefix.

    Args:
      directory: a checkpoint directory.
    Returns:
      the checkpoint prefix DIR/BASENAME-N with the highest N.
    Raises:
      CheckpointError when it holds none, or checkpoints of several prefixes (which one is meant is
      then the caller's to say).
    """
    directory = os.path.abspath(os.fspath(directory))
    entries = _list_directory(directory)
    basenames = sorted({entry[:-len(".index")].rpartition("-")[0] for entry in entries
                        if entry.endswith(".index") and step_of(entry[:-len(".index")]) is not None})
    if not basenames:
        raise CheckpointError("checkpoint directory %s holds no checkpoint (no NAME-N.index file)" % directory,
                              directory)
    if len(basenames) > 1:
        raise CheckpointError("checkpoint directory %s holds checkpoints of %d prefixes (%s); expected one, or the "
                              "prefix of the checkpoint to use" % (directory, len(basenames), ", ".join(basenames)),
                              directory)
    return list_checkpoints(os.path.join(directory, basenames[0]))[0][0]


def resolve(checkpoint):
    """A checkpoint prefix from a checkpoint (DIR/BASENAME-N), a prefix (DIR/BASENAME: its newest) or a directory.

    Returns:
      the checkpoint prefix DIR/BASENAME-N.
    Raises:
      CheckpointError when nothing matches.
    """
    checkpoint = os.fspath(checkpoint)
    if os.path.isdir(checkpoint):
        return latest_in_directory(checkpoint)
    if os.path.lexists(checkpoint + ".index"):
        return checkpoint
    found = list_checkpoints(checkpoint)[0]
    if not found:
        raise CheckpointError("checkpoint %s does not exist (no %s.index and no %s-N.index); expected a checkpoint "
                              "prefix or directory" % (checkpoint, checkpoint, checkpoint), checkpoint)
    return found[0]


def prune_checkpoints(prefix, keep, protect=()):
    """Delete all but the `keep` newest checkpoints of `prefix`, across any number of resumed runs.

    Args:
      prefix: the checkpoint path prefix (DIR/BASENAME); other prefixes in the directory are untouched.
      keep: how many of the newest checkpoints to keep (>= 1).
      protect: checkpoint prefixes never deleted (e.g. the one just restored from).
    Returns:
      the checkpoint prefixes deleted.
    Raises:
      OSError from deleting a file (the caller names it).
    """
    protected = {os.path.abspath(os.fspath(p)) for p in protect}
    candidates = list_checkpoints(prefix)[0]
    deleted = []
    for checkpoint in candidates[max(int(keep), 1):]:
        if checkpoint in protected:
            continue
        for path in checkpoint_files(checkpoint):
            os.remove(path)
        deleted.append(checkpoint)
    return deleted


def discard_partial_save(checkpoint):
    """Remove the temporary files a failed save of `checkpoint` left behind (TensorFlow's *tempstate*)."""
    directory, name = _split_prefix(checkpoint)
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(name + ".") and "tempstate" in entry:
            try:
                os.remove(os.path.join(directory, entry))
            except OSError:
                pass
