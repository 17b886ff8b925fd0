"""TensorBoard event files whose write failures are noticed and named, never lost in silence or a traceback.

TensorFlow's event writer writes from a background thread: on a full disk it either drops the events
without a word (its flush status is ignored) or raises a RuntimeError from a later flush. This writer counts
the bytes it hands over and compares them with the file's size after every flush, and turns any exception
into a recorded failure, so the training loop can save its checkpoint first and then stop with one line.
"""
import os
import shutil
import threading
import time

import tensorflow as tf

from learners.errors import UserError
from tfquant import files

tf1 = tf.compat.v1
# A TFRecord around each event: length (8 bytes), its CRC (4), the event, the event's CRC (4).
_RECORD_OVERHEAD = 16


def _writer_thread_failure(record):
    return "EventFileWriter writer thread error" not in record.getMessage()


def _quiet_writer_thread_failures():
    """The writer thread's failure is this module's to report (one line, after the checkpoint is saved):
    TensorFlow's own error log line and the thread's traceback on stderr would come before it."""
    logger = tf.get_logger()
    if _writer_thread_failure not in logger.filters:
        logger.addFilter(_writer_thread_failure)
    if getattr(threading.excepthook, "_tfquant_quiet", False):
        return
    previous = threading.excepthook

    def hook(args):
        if args.thread is not None and args.thread.name == "EventLoggerThread":
            return  # recorded in the writer's failure_exc_info, raised by its next flush
        previous(args)

    hook._tfquant_quiet = True  # pylint: disable=protected-access
    threading.excepthook = hook


class SummaryWriteError(UserError):
    """An event file in --log_dir could not be written."""


class SummaryWriter:
    """A tf1 FileWriter that checks every flush reached the file; `failure` holds the first reason."""

    def __init__(self, log_dir, graph=None):
        """log_dir: the event file's directory; graph: written first (as FileWriter(log_dir, graph) does)."""
        self.log_dir = log_dir
        self.failure = None
        self.path = None
        self._writer = None
        self._expected = 0
        _quiet_writer_thread_failures()
        try:
            with tf.Graph().as_default():  # FileWriter refuses eager mode, and needs no graph of ours
                self._writer = tf1.summary.FileWriter(log_dir)
            self._writer.flush()
            self.path = self._event_file()
            self._expected = os.path.getsize(self.path) if self.path else 0
        except (OSError, RuntimeError, tf.errors.OpError) as exc:
            self._fail(exc)
            return
        if graph is not None:
            self._add(tf1.Event(wall_time=time.time(), graph_def=graph.as_graph_def(add_shapes=True)
                                .SerializeToString()))

    def _event_file(self):
        name = getattr(getattr(self._writer.event_writer, "_ev_writer", None), "FileName", None)
        if name is not None:
            name = name()
            return name.decode() if isinstance(name, bytes) else name
        found = [os.path.join(self.log_dir, n) for n in os.listdir(self.log_dir) if n.startswith("events.out")]
        return max(found, key=os.path.getmtime) if found else None

    def _fail(self, exc_or_reason):
        if self.failure is None:
            self.failure = (exc_or_reason if isinstance(exc_or_reason, str)
                            else files.error_cause(exc_or_reason)[0])

    def _add(self, event):
        if self.failure is not None or self._writer is None:
            return
        try:
            self._writer.add_event(event)
            self._expected += len(event.SerializeToString()) + _RECORD_OVERHEAD
        except (OSError, RuntimeError, tf.errors.OpError) as exc:
            self._fail(exc)

    def add_summary(self, summary, step):
        """Queue a serialized Summary (what sess.run of a summary op returns) or a Summary proto at `step`."""
        if isinstance(summary, bytes):
            summary = tf1.Summary.FromString(summary)
        self._add(tf1.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self):
        """Write the queued events; returns False (and sets `failure`) when they did not all reach the file."""
        if self.failure is not None or self._writer is None:
            return self.failure is None
        try:
            self._writer.flush()
            size = os.path.getsize(self.path) if self.path else self._expected
        except (OSError, RuntimeError, tf.errors.OpError) as exc:
            self._fail(exc)
            return False
        if size < self._expected:
            try:
                free = shutil.disk_usage(self.log_dir).free
            except OSError:
                free = None
            short = self._expected - size
            self._fail(os.strerror(28) if free is not None and free < short + 65536
                       else "%d of the %d bytes written are missing from the file" % (short, self._expected))
            return False
        return True

    def close(self):
        """Flush and close; never raises (the failure, if any, stays in `failure`)."""
        self.flush()
        if self._writer is not None:
            try:
                self._writer.close()
            except (OSError, RuntimeError, tf.errors.OpError) as exc:
                self._fail(exc)
            self._writer = None

    def error(self, saved):
        """The SummaryWriteError of the failure, saying what was kept (`saved`), or None."""
        if self.failure is None:
            return None
        where = self.path or self.log_dir
        return SummaryWriteError("TensorBoard event file %s cannot be written (%s); expected a writable --log_dir "
                                 "with free space; %s" % (where, self.failure, saved))
