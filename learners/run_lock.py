"""One process per run directory: the process that writes a checkpoint directory holds its lock.

Two runs on one directory would both save under the same prefix and each resume from the other's
half-finished checkpoints. The lock (tfquant.files.lock_directory: an flock the operating system releases
when the process dies) is taken before anything is written there; a second process stops with one line
naming the directory and the holder's pid. On a cluster only the chief writes, so only the chief locks.
A fine-tuning run only reads its finished float checkpoint, so it holds that directory shared: several
fine-tunings may start from one float model at once, while a run that would write there (training or finishing
the float model) needs it alone.
"""
import os

from learners import directory_flags, early_lock
from learners.errors import UserError
from tfquant import files

# Locking starts when a run script says which role this process has (runner.py); learners driven from Python
# (tests, benchmarks) lock nothing unless they call set_chief too, so a test process that wrote a settings record
# never blocks the run-script processes it starts on the same directory.
_role = {"chief": True, "enabled": False}


def set_chief(is_chief):
    """Turn locking on for this process: whether it is the one that writes (False on the other workers of a
    cluster: they never lock)."""
    _role["chief"] = bool(is_chief)
    _role["enabled"] = True


def hold(prefix, create=True, shared=False):
    """Hold the lock of the directory of checkpoint prefix `prefix` until this process ends.

    Args:
      prefix: a checkpoint path prefix (DIR/BASENAME); DIR is locked.
      create: create DIR when missing; with False a missing DIR is left alone (nothing to protect yet).
      shared: as a reader (tfquant.files.lock_directory); an exclusive hold upgrades a shared one.
    Raises:
      UserError: another process holds it, or the lock file cannot be created.
    """
    _hold_directory(os.path.dirname(os.path.abspath(prefix)), create, shared)


def hold_all(prefixes, create=True):
    """hold() the directory of every (prefix, shared) pair of directory_flags.locked_prefixes, each once."""
    for directory, shared in directory_flags.directory_modes(prefixes):
        _hold_directory(directory, create, shared)


def _hold_directory(directory, create, shared):
    if not (_role["enabled"] and _role["chief"]):
        return
    if not create and not os.path.isdir(directory):
        return
    try:
        files.lock_directory(directory, shared)
    except files.DirectoryInUse as exc:
        raise UserError(early_lock.in_use_message(directory, exc.pid)) from None
    except OSError as exc:
        raise UserError("run directory %s cannot be locked (%s); expected a writable directory"
                        % (directory, files.describe_error(exc))) from None
