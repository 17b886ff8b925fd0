"""A directory built beside its destination and moved into place with one rename once complete.

The staging directory sits on the destination's file system (in its nearest existing ancestor) and is named
after the destination and the building process, so a later build finds what a killed one left: staging
directories of dead processes are removed, and a previous version set aside by a build killed before the final
rename is put back. A failure leaves the destination as it was (or absent); a previous version there is
replaced only by a complete new one.
"""
import os
import re
import shutil
import tempfile

from tfquant import files


def create(destination):
    """A new empty staging directory for `destination` (an absolute path), after clearing dead builds' leftovers.

    Its mode is the one a plain mkdir would give (mkdtemp's 0700 would otherwise become the destination's).
    """
    root = _existing_ancestor(os.path.dirname(destination))
    _clean_stale(destination, root)
    staging = tempfile.mkdtemp(prefix=".%s.export-%d-" % (os.path.basename(destination), os.getpid()), dir=root)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    return staging


def _existing_ancestor(path):
    """The nearest existing directory at or above `path` (staging goes there: same file system)."""
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _clean_stale(destination, root):
    """Remove staging directories of killed builds of `destination`; restore a previous version set aside."""
    base = os.path.basename(destination)
    pattern = re.compile(r"^\.%s\.(export|old)-(\d+)-" % re.escape(base))
    for name in sorted(os.listdir(root)):
        found = pattern.match(name)
        if not found or files.is_alive(int(found.group(2))):
            continue
        path = os.path.join(root, name)
        if found.group(1) == "old" and root == os.path.dirname(destination) and not os.path.lexists(destination):
            os.rename(path, destination)  # killed between setting the old export aside and moving the new one in
        else:
            shutil.rmtree(path, ignore_errors=True)


def publish(staging, destination):
    """Move the complete staging directory to `destination`, replacing a previous version only then."""
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    if not os.path.lexists(destination):
        os.rename(staging, destination)
        return
    old = tempfile.mkdtemp(prefix=".%s.old-%d-" % (os.path.basename(destination), os.getpid()),
                           dir=os.path.dirname(destination))
    os.rmdir(old)  # only the unique name is wanted; rename needs a free target
    os.rename(destination, old)
    try:
        os.rename(staging, destination)
    except BaseException:
        os.rename(old, destination)
        raise
    shutil.rmtree(old, ignore_errors=True)


def failure_message(exc, staging, output_dir, given):
    """One line for an OSError of a build, naming the path the user gave, never the staging directory.

    Args:
      exc: the OSError.
      staging: the staging directory (None before it was made).
      output_dir: the destination (absolute).
      given: how the user named it, e.g. '--output_dir=out'.
    """
    reason, _, path = files.error_cause(exc)
    path = os.fspath(path) if path is not None else None
    base = re.escape(os.path.basename(output_dir))
    if path and staging and (path == staging or path.startswith(staging + os.sep)):
        path = output_dir + path[len(staging):]
    elif path and re.match(r"^\.%s\.(export|old)-\d+-" % base, os.path.basename(path)):
        path = output_dir  # the staging directory (or the set-aside old export) itself could not be made
    elif path and not (path == output_dir or path.startswith(output_dir + os.sep)):
        return "%s cannot be accessed (%s) during the export to %s" % (path, reason, given)
    where = "" if path in (None, output_dir) else ": %s" % path
    return "%s cannot be written (%s%s); expected a writable directory with free space" % (given, reason, where)
