"""The run directory's lock taken before TensorFlow is imported, so a second run on a directory stops at once.

A run script calls hold_run_directories() first thing: it parses the directory flags (learners/directory_flags.py,
the definitions the real parse uses, with absl's own parser) and takes the lock of every directory the run will
lock, when that directory exists already, as tfquant.files.lock_directory does: an flock on DIR/.tfquant.lock
with the holder's pid in it. The held file descriptors stay open for the life of the process; once tfquant can be
imported, run_lock hands them to tfquant.files (adopt_lock), so the later lock of the same directory re-uses them
instead of taking a second flock, which the first would refuse.

Anything this parse cannot settle (a malformed flag, an unreadable TF_CONFIG, a lock file that cannot be created)
takes no lock here: the real parse and lock, after TensorFlow's import, report it in their usual one line.
Only a process that would hold the lock takes it: on a cluster the chief (worker 0 of TF_CONFIG) alone.
"""
import errno
import fcntl
import json
import os
import sys
import time

from absl import flags

from learners import directory_flags

LOCK_NAME = ".tfquant.lock"  # tfquant.files.LOCK_NAME (a test checks they agree)
_held = {}  # real path of a directory -> the descriptor of its lock file


class _HeldElsewhere(Exception):
    """Another live process holds `directory` (its pid, None when unreadable)."""

    def __init__(self, directory, pid):
        super().__init__(directory, pid)
        self.directory = directory
        self.pid = pid


def in_use_message(directory, pid):
    """The one line (without 'error: ') a run refused by a held run directory prints."""
    holder = "process %d" % pid if pid else "another process"
    return ("run directory %s is in use by %s (lock %s); expected one process per run directory: wait for it to "
            "end, or choose another --save_path / --uql_save_quant_model_path"
            % (directory, holder, os.path.join(directory, LOCK_NAME)))


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
      a list of absolute directory paths, empty where nothing is locked or the flags do not parse.
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
    found = []
    for prefix in prefixes:
        directory = os.path.dirname(os.path.abspath(prefix))
        if os.path.isdir(directory) and directory not in found:
            found.append(directory)
    return found


def _read_holder(fd):
    for _ in range(20):
        # The holder writes its pid right after taking the lock; a reader may come in between.
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


def hold(directory):
    """Take the lock of `directory` for this process (nothing when taken already).

    Raises:
      _HeldElsewhere: another live process holds it (caught by hold_run_directories; never a user's error).
      OSError: the lock file cannot be created or locked.
    """
    directory = os.path.realpath(directory)
    if directory in _held:
        return
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_holder(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _HeldElsewhere(directory, holder) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    _held[directory] = fd


def held():
    """{real directory path: lock file descriptor} of the locks taken here (for tfquant.files.adopt_lock)."""
    return dict(_held)


def hold_run_directories(argv=None, environ=None):
    """Lock the run directories of this run script's command line; a held one ends the process (status 2) with
    one 'error:' line naming it and its holder's pid."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    for directory in directories_to_lock(argv, environ):
        try:
            hold(directory)
        except _HeldElsewhere as exc:
            sys.stderr.write("error: %s\n" % in_use_message(directory, exc.pid))
            sys.exit(2)
        except OSError:
            return  # the lock after TensorFlow's import names the cause
