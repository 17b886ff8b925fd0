"""Reading files that may come from elsewhere: regular files only, bounded sizes, strict JSON.

Every reader in tfquant, learners and nets goes through these helpers, so a FIFO cannot block a
reader, a device or a huge file cannot exhaust memory, and a crafted JSON document cannot recurse
without limit or hide a second value under a duplicate key. Each helper raises the caller's own
error class (PackedFileError, ReportError, DataError, ...) with one line naming the path.
"""
import contextlib
import errno
import fcntl
import itertools
import json
import os
import re
import secrets
import stat
import time
import zlib

from tfquant.errors import TfquantError

# Default ceiling for small metadata files (reports, results, run settings, state files).
SMALL_FILE_LIMIT = 16 * 1024 * 1024
JSON_MAX_DEPTH = 64
_INFLATE_CHUNK = 1 << 16


def _first_line(exc):
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def regular_file_size(path, error_cls, what="file"):
    """Size in bytes of `path`, which must be an existing regular file (not a FIFO, device or directory).

    Args:
      path: str or os.PathLike.
      error_cls: exception class raised on failure, with one message line naming the path.
      what: what the file is, for the message ("packed model", "quantization report", ...).
    Returns:
      the size from os.stat (symbolic links are followed).
    """
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise error_cls("%s %s cannot be read (%s); expected an existing regular file"
                        % (what, path, _first_line(exc))) from None
    if not stat.S_ISREG(info.st_mode):
        kind = ("a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode)
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
                else "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file")
        raise error_cls("%s %s is %s; expected a regular file" % (what, path, kind))
    return info.st_size


def open_regular(path, error_cls, what="file"):
    """(binary file object, size) of a regular file; opened without blocking on FIFOs swapped in late."""
    path = os.fspath(path)
    regular_file_size(path, error_cls, what)
    try:
        # O_NONBLOCK keeps open() from waiting on a FIFO put in place between stat and open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error_cls("%s %s cannot be opened (%s); expected a readable regular file"
                        % (what, path, _first_line(exc))) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise error_cls("%s %s is not a regular file; expected a regular file" % (what, path))
    return os.fdopen(fd, "rb"), info.st_size


def read_bounded(path, error_cls, what="file", limit=SMALL_FILE_LIMIT):
    """All bytes of a regular file no larger than `limit` bytes."""
    handle, size = open_regular(path, error_cls, what)
    with handle:
        if size > limit:
            raise error_cls("%s %s is %d bytes; expected at most %d" % (what, os.fspath(path), size, limit))
        try:
            # Asking for `size` (not `limit`) bytes first: read(n) allocates n bytes before reading.
            data = handle.read(size + 1)
            if len(data) > size:
                data += handle.read(limit + 1 - len(data))
        except OSError as exc:
            raise error_cls("%s %s cannot be read (%s)" % (what, os.fspath(path), _first_line(exc))) from None
    if len(data) > limit:
        raise error_cls("%s %s grew past %d bytes while being read" % (what, os.fspath(path), limit))
    return data


def read_text(path, error_cls, what="file", limit=SMALL_FILE_LIMIT):
    """A bounded regular file decoded as UTF-8."""
    data = read_bounded(path, error_cls, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error_cls("%s %s is not UTF-8 text (byte %d); expected a text file"
                        % (what, os.fspath(path), exc.start)) from None


def inflate_bounded(data, limit, error_cls, where, wbits=zlib.MAX_WBITS):
    """zlib/gzip-decompress `data` in chunks, refusing more than `limit` output bytes or trailing junk.

    Args:
      data: compressed bytes.
      limit: largest acceptable decompressed size.
      error_cls: exception class for failures.
      where: names the source in messages.
      wbits: zlib wbits (MAX_WBITS: zlib stream; 16 + MAX_WBITS: gzip member).
    Returns:
      the decompressed bytes.
    """
    inflater = zlib.decompressobj(wbits)
    pieces, total = [], 0
    view = memoryview(data)
    try:
        while True:
            piece = inflater.decompress(view, min(_INFLATE_CHUNK, limit + 1 - total))
            total += len(piece)
            pieces.append(piece)
            if total > limit:
                raise error_cls("%s: decompresses to more than %d bytes; expected at most %d" % (where, limit, limit))
            view = inflater.unconsumed_tail
            if inflater.eof or not view:
                break
    except zlib.error as exc:
        raise error_cls("%s: cannot be decompressed (%s)" % (where, _first_line(exc))) from None
    if not inflater.eof:
        raise error_cls("%s: compressed data is truncated" % where)
    if inflater.unused_data:
        raise error_cls("%s: %d bytes of trailing data after the compressed stream"
                        % (where, len(inflater.unused_data)))
    return b"".join(pieces)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    result = dict(pairs)  # built in C; only a length mismatch needs the slow search for the key
    if len(result) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey("duplicate key %r" % key)
            seen.add(key)
    return result


def _reject_constant(name):
    raise ValueError("%s is not valid JSON; expected finite numbers" % name)


# A JSON string (with escapes), written unrolled so matching stays linear in its length.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = re.compile(r"[\[\]{}]")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _depth(text):
    """Deepest nesting of [ and { outside strings (checked before json recursion can overflow).

    Strings are cut out and only brackets are visited, so a multi-megabyte document is scanned in
    C-speed passes rather than character by character in Python.
    """
    steps = map(_BRACKET_STEP.__getitem__, _BRACKET.findall(_JSON_STRING.sub("", text)))
    return max(0, max(itertools.accumulate(steps), default=0))


def loads_json(text, error_cls, where, max_depth=JSON_MAX_DEPTH):
    """Parse JSON strictly: nesting at most max_depth, no duplicate keys, no NaN/Infinity literals."""
    if _depth(text) > max_depth:
        raise error_cls("%s: JSON nested deeper than %d levels" % (where, max_depth))
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise error_cls("%s: not valid JSON (%s)" % (where, " ".join(str(exc).split()))) from None


def load_json_file(path, error_cls, what="JSON file", limit=SMALL_FILE_LIMIT, max_depth=JSON_MAX_DEPTH):
    """A regular, bounded, UTF-8, strictly parsed JSON file."""
    text = read_text(path, error_cls, what, limit)
    return loads_json(text, error_cls, "%s %s" % (what, os.fspath(path)), max_depth)


@contextlib.contextmanager
def atomic_writer(path):
    """A binary file handle whose contents replace `path` when the block ends without an exception.

    The handle writes a temporary file of a unique name in the same directory (two writers never share one),
    created with mode 0o666 less the umask like any ordinary output file; at the end of the block it is flushed
    to disk and renamed over `path`, so readers see the old file or the new one, never a part. On an exception
    (KeyboardInterrupt included) the temporary file is removed and `path` is left as it was. OSError propagates
    (the caller names the path in its own error).
    """
    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, ".%s.%d.%s.tmp" % (base, os.getpid(), secrets.token_hex(4)))
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename in (None, temporary):
            # A failed write or flush carries no file name (or the temporary's): name the file being written.
            raise OSError(exc.errno, exc.strerror, path) from None
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself is done


def write_atomically(path, data):
    """Write bytes or text (UTF-8) to `path` through `atomic_writer`."""
    with atomic_writer(path) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


# -- why a write failed ------------------------------------------------------------------------------------

# Lines of a TensorFlow error message that locate it but never say why: the graph-execution banner, the
# "Detected at node ... defined at" stack, the node markers and the out-of-memory hint.
_LOCATION_LINE = re.compile(r"^(Graph execution error:?|Detected at node|File \"|Node: |\[\[|Hint: |Original stack trace"
                            r"|\(\d+\) |\d+ (root )?error)")
_TEMPORARY_SUFFIX = re.compile(r"\.tempstate\d+$|\.tmp[0-9a-f]+$")
_NODE = re.compile(r"node '?([^'\s}]+)")


def error_cause(exc):
    """Why an OSError or a TensorFlow error happened, as (reason, op name or None, file or None).

    TensorFlow's messages start with where the op was defined (a stack several hundred characters long);
    the cause, e.g. "<file>; No space left on device", is the last line that is not such location text.
    A temporary name TensorFlow writes under (FILE.tempstate123) is reported as the file it stands for.
    """
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror, None, exc.filename
    text = str(getattr(exc, "message", None) or exc or type(exc).__name__)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if not _LOCATION_LINE.match(line)
              and not line.startswith(("Original stack trace", "File "))]
    # "<file>; <reason>" is the cause itself; lines after it ("Failed to flush 2 events to ...") only follow from it.
    with_file = [line for line in causes if re.match(r"^\S+; \S", line)]
    cause = (with_file or causes or lines or [type(exc).__name__])[-1]
    op = getattr(getattr(exc, "op", None), "name", None)
    if op is None:
        found = _NODE.search(text)
        op = found.group(1) if found else None
    path = None
    head, separator, tail = cause.partition("; ")
    if separator and ("/" in head or "." in head) and " " not in head:
        path, cause = _TEMPORARY_SUFFIX.sub("", head), tail
    return " ".join(cause.split()), op, path


def describe_error(exc):
    """error_cause on one line: 'REASON (op OP, file FILE)' with the parts that are known."""
    reason, op, path = error_cause(exc)
    details = ["op %s" % op] if op else []
    if path:
        details.append("file %s" % path)
    return "%s (%s)" % (reason, ", ".join(details)) if details else reason


# -- one process per directory -------------------------------------------------------------------------------

LOCK_NAME = ".tfquant.lock"
_held_locks = {}
_shared_locks = set()  # directories of _held_locks this process holds shared (readers), not exclusive


class DirectoryInUse(TfquantError):
    """Another live process holds the directory's lock; `pid` is its process id (None when unknown)."""

    def __init__(self, directory, pid):
        super().__init__("%s is in use by %s" % (directory, "process %d" % pid if pid else "another process"))
        self.directory = directory
        self.pid = pid


def is_alive(pid):
    """Whether process `pid` exists (someone else's process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _read_holder(fd):
    """The pid of a live holder named in the lock file (an exclusive holder writes only its own, shared holders
    append theirs, so dead readers' lines are skipped), or None."""
    pids = []
    for _ in range(20):
        # A holder writes its pid right after taking the lock; a reader may come in between.
        text = os.pread(fd, 4096, 0).decode("ascii", "replace")
        pids = [int(word) for word in text.split() if word.isdigit()]
        live = [pid for pid in pids if pid != os.getpid() and is_alive(pid)]
        if live:
            return live[-1]
        time.sleep(0.01)
    # None seen alive: a holder in another pid namespace, say; the last one named is the best guess.
    return pids[-1] if pids else None


def _refused(fd, path, exc):
    """The error of a failed flock on the open lock file `fd` (closed by the caller)."""
    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        return OSError(exc.errno, exc.strerror, path)
    return DirectoryInUse(os.path.dirname(path), _read_holder(fd))


def _note_holder(fd, path, shared):
    """Name this process in the lock file: an exclusive holder replaces its contents, a shared one appends."""
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        return
    appender = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
    try:
        os.write(appender, b"%d\n" % os.getpid())
    finally:
        os.close(appender)


def lock_directory(directory, shared=False):
    """Hold the advisory lock of `directory` (created if missing) until this process ends.

    The lock is an flock on DIRECTORY/.tfquant.lock, so the operating system releases it when the process
    dies however it dies: a lock file left by a dead process never blocks. Taking a lock this process
    already holds does nothing, except that an exclusive request upgrades a shared lock (refused while other
    processes share it).
    Args:
      directory: the directory (a run's checkpoint directory).
      shared: hold it as a reader: any number of processes may share it, none may hold it exclusively meanwhile
        (a fine-tuning run reading a finished float checkpoint that other runs read too).
    Returns:
      the lock file's path.
    Raises:
      DirectoryInUse: another live process holds it (its pid is read from the lock file).
      OSError: the directory or lock file cannot be created.
    """
    directory = os.path.realpath(directory)
    path = os.path.join(directory, LOCK_NAME)
    if directory in _held_locks:
        if shared or directory not in _shared_locks:
            return path
        return _upgrade(directory, path)
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        error = _refused(fd, path, exc)
        os.close(fd)
        raise error from None
    _note_holder(fd, path, shared)
    _held_locks[directory] = fd
    if shared:
        _shared_locks.add(directory)
    return path


def _upgrade(directory, path):
    """Turn this process's shared lock of `directory` into an exclusive one."""
    fd = _held_locks[directory]
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        error = _refused(fd, path, exc)
        # flock drops the shared lock before it tries the exclusive one: take the shared one back.
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            release_directory(directory)
        raise error from None
    _shared_locks.discard(directory)
    _note_holder(fd, path, False)
    return path


def holds_lock(directory):
    """Whether this process holds the lock of `directory` (taken by lock_directory, not yet released)."""
    return os.path.realpath(directory) in _held_locks


def release_directory(directory):
    """Release a lock taken by lock_directory (processes that end need not: the OS releases it)."""
    fd = _held_locks.pop(os.path.realpath(directory), None)
    _shared_locks.discard(os.path.realpath(directory))
    if fd is not None:
        os.close(fd)
