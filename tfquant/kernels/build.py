"""Compile the activation kernels (activation_quant.cc) into lib/ of this package.

    python -m tfquant.kernels.build [--force] [--output_dir DIR]

Builds only when the library is missing or was built from another source, TensorFlow version or compile
flags (recorded in a stamp file next to it). A failed build prints one line and exits with status 1;
training graphs then use the plain op chain (tfquant.kernels.status() says why).
"""
import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile

from tfquant.kernels import LIBRARY_DIR, LIBRARY_NAME, PACKAGE_DIR

SOURCE = os.path.join(PACKAGE_DIR, "activation_quant.cc")
# -ffp-contract=off: no multiply and add fused into one FMA (a single rounding would change float32 results).
OPTIONS = ["-shared", "-fPIC", "-O3", "-ffp-contract=off"]
BUILD_SECONDS = 600


def source_digest(source=SOURCE):
    """sha256 of the kernel source, as `sha256sum` prints it (tools/setup_env.sh compares the two)."""
    with open(source, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _compiler():
    return shlex.split(os.environ.get("CXX", "g++"))


def expected_stamp(source=SOURCE):
    """What a library built from `source` for the installed TensorFlow records: digest, version, flags.

    Not the compiler: a library built with CXX set stays current in a shell without it.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  (only a build or a load needs it)
    flags = tf.sysconfig.get_compile_flags() + OPTIONS + tf.sysconfig.get_link_flags()
    return "\n".join([source_digest(source), tf.__version__, " ".join(flags)]) + "\n"


def library_path(output_dir=LIBRARY_DIR):
    return os.path.join(output_dir, LIBRARY_NAME)


def stamp_path(output_dir=LIBRARY_DIR):
    return library_path(output_dir) + ".stamp"


def is_current(output_dir=LIBRARY_DIR, source=SOURCE):
    """Whether the library in `output_dir` exists and was built from `source` for this TensorFlow."""
    try:
        with open(stamp_path(output_dir)) as handle:
            recorded = handle.read()
    except OSError:
        return False
    return os.path.isfile(library_path(output_dir)) and recorded == expected_stamp(source)


def build(output_dir=LIBRARY_DIR, source=SOURCE, force=False):
    """Compile `source` into `output_dir` unless it is current; returns (ok, one-line message)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if not force and is_current(output_dir, source):
        return True, "activation kernels are up to date: %s" % library_path(output_dir)
    stamp = expected_stamp(source)
    command = _compiler() + tf.sysconfig.get_compile_flags() + OPTIONS + [source, "-o"]
    link = tf.sysconfig.get_link_flags()
    try:
        os.makedirs(output_dir, exist_ok=True)
        # Written next to the library and renamed over it, so a process loading it never sees half a file.
        handle, partial = tempfile.mkstemp(suffix=".so", dir=output_dir)
        os.close(handle)
    except OSError as error:
        return False, "cannot write to %s (%s)" % (output_dir, error.strerror or error)
    try:
        result = subprocess.run(command + [partial] + link, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, timeout=BUILD_SECONDS, check=False)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            return False, "%s failed: %s" % (command[0], (errors or ["exit status %d" % result.returncode])[0].strip())
        os.replace(partial, library_path(output_dir))
        with open(stamp_path(output_dir), "w") as out:
            out.write(stamp)
    except FileNotFoundError:
        return False, "compiler %r not found (set CXX to a C++17 compiler)" % command[0]
    except subprocess.TimeoutExpired:
        return False, "%s took more than %d s" % (command[0], BUILD_SECONDS)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return True, "built %s" % library_path(output_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compile tfquant's activation kernels.")
    parser.add_argument("--force", action="store_true", help="rebuild even when the library is current")
    parser.add_argument("--output_dir", default=LIBRARY_DIR, help="directory of the library (default: lib/ in the package)")
    args = parser.parse_args(argv)
    ok, message = build(args.output_dir, force=args.force)
    if not ok:
        print("tfquant: could not build the activation kernels (%s); training graphs use the op chain" % message,
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
