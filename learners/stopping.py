"""Stopping cleanly on SIGTERM/SIGINT: the handler only records the signal; the run stops at a safe point.

A checkpoint save, a report write or an evaluation is never cut in half: the training loop saves at the
current step and raises Stopped, the other safe points (between phases, between evaluation batches,
before results are written) raise Stopped with nothing half-written. The run script exits 128 + signum.
"""
import os
import signal
import sys
import time

# Test hook: the named point (e.g. "save", "report") logs "pause: <name>" once and waits for a signal.
PAUSE_ENV = "TFQUANT_TEST_PAUSE_AT"
PAUSE_LIMIT_SECONDS = 60.0
# Test hook: a paused run also goes on (without stopping) once this file exists.
RESUME_FILE_ENV = "TFQUANT_TEST_RESUME_FILE"
_HANDLED = (signal.SIGTERM, signal.SIGINT)
_requested = []
_paused = set()


class Stopped(Exception):
    """The run stopped on a signal; every file saved so far is complete. exit_status is 128 + signum."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


def _record(signum, frame):  # pylint: disable=unused-argument
    # Later signals are ignored: the save under way finishes, then the run stops (kill -9 stops at once).
    if not _requested:
        _requested.append(signum)


def install():
    """Route SIGTERM and SIGINT to a stop request (called once by the run script, in the main thread)."""
    del _requested[:]
    for signum in _HANDLED:
        signal.signal(signum, _record)


def requested():
    """The signal number of a pending stop request, or None."""
    return _requested[0] if _requested else None


def signal_name(signum):
    """'SIGTERM', 'SIGINT', ..."""
    return signal.Signals(signum).name


def check(where, saved):
    """Raise Stopped if a stop was requested; `where` and `saved` complete the one line it carries.

    Args:
      where: e.g. "during evaluation".
      saved: what is on disk, e.g. "saved checkpoints are kept".
    """
    signum = requested()
    if signum is not None:
        raise Stopped("stopped by %s %s; %s; run the same command to resume" % (signal_name(signum), where, saved),
                      signum)


def pause_point(name):
    """Test hook: at the point PAUSE_ENV names, log 'pause: <name>' (first time only) and wait for a signal."""
    if os.environ.get(PAUSE_ENV) != name or name in _paused:
        return
    _paused.add(name)
    sys.stdout.write("pause: %s\n" % name)
    sys.stdout.flush()
    deadline = time.time() + PAUSE_LIMIT_SECONDS
    resume_file = os.environ.get(RESUME_FILE_ENV)
    while requested() is None and time.time() < deadline:
        if resume_file and os.path.exists(resume_file):
            break
        time.sleep(0.02)
