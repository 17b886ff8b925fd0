"""The run directory's lock taken before TensorFlow is imported, so a second run on a directory stops at once.

A run script calls hold_run_directories() first thing: it parses the directory flags (learners/directory_flags.py,
the definitions the real parse uses, with absl's own parser) and takes the lock of every directory the run will
lock, when that directory exists already, with tfquant.files.lock_directory itself (an flock on DIR/.tfquant.lock
with the holder's pid in it; tfquant.files imports no TensorFlow, and the tfquant package imports its public names
only on first use). The lock stays held for the life of the process, so the run's later lock of the same directory
(learners/run_lock.py) finds it held and takes nothing.

Anything this parse cannot settle (a malformed flag, an unreadable TF_CONFIG, a lock file that cannot be created)
takes no lock here: the real parse and lock, after TensorFlow's import, report it in their usual one line.
Only a process that would hold the lock takes it: on a cluster the chief (worker 0 of TF_CONFIG) alone.
"""
import json
import os
import sys

from absl import flags

from learners import directory_flags
from tfquant import files  # no TensorFlow: see tfquant/__init__.py


def in_use_message(directory, pid):
    """The one line (without 'error: ') a run refused by a held run directory prints."""
    holder = "process %d" % pid if pid else "another process"
    return ("run directory %s is in use by %s (lock %s); expected one process per run directory: wait for it to "
            "end, or choose another --save_path / --uql_save_quant_model_path"
            % (directory, holder, os.path.join(directory, files.LOCK_NAME)))


def _is_chief(environ):
    """False only for a worker other than 0 of a multi-worker TF_CONFIG; None when TF_CONFIG cannot be read."""
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        return True
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        index = config["task"]["index"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(workers, list) or isinstance(index, bool) or not isinstance(index, int):
        return None
    return len(workers) == 1 or index == 0


def directories_to_lock(argv, environ):
    """The existing directories a run with command-line flags `argv` (without the program) would lock now.

    Args:
      argv: the run script's arguments.
      environ: the environment (TF_CONFIG decides the chief).
    Returns:
      [(absolute directory path, shared)] (directory_flags.locked_prefixes), empty where nothing is locked or
      the flags do not parse.
    """
    values = flags.FlagValues()
    directory_flags.define(values)
    try:
        values(["run"] + list(argv), known_only=True)
    except flags.Error:
        return []  # the real parse says what is wrong, in its own words
    if _is_chief(environ) is not True:
        return []
    prefixes = directory_flags.locked_prefixes(values.learner, values.exec_mode, values.save_path,
                                               values.uql_save_quant_model_path)
    return directory_flags.directory_modes(prefixes, os.path.isdir)


def hold_run_directories(argv=None, environ=None):
    """Lock the run directories of this run script's command line; a held one ends the process (status 2) with
    one 'error:' line naming it and its holder's pid."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    for directory, shared in directories_to_lock(argv, environ):
        try:
            files.lock_directory(directory, shared)
        except files.DirectoryInUse as exc:
            sys.stderr.write("error: %s\n" % in_use_message(directory, exc.pid))
            sys.exit(2)
        except OSError:
            return  # the lock after TensorFlow's import names the cause
