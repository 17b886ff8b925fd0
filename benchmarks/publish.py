"""Where benchmark figures go: result JSON files, and the locked, section-by-section BENCHMARKS.md writer.

Every script runs as `python -m benchmarks.<name>` from the repository root. A --quick run never writes
BENCHMARKS.md; a full run writes its section only when the machine was quiet at its start and end, or
with --allow_busy, which marks the section.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import tempfile

from benchmarks import machine
from tfquant import files

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(REPO_ROOT, "BENCHMARKS.md")
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")


class BenchmarkError(Exception):
    """A user-caused problem (busy machine, unusable results file): one `error:` line, exit status 2."""


def add_arguments(parser, output_help="write the results as JSON here", render_json=True):
    """The flags every benchmark shares: --quick, --output, --markdown, --allow_busy and --render_json."""
    parser.add_argument("--quick", action="store_true", help="a smoke run for the tests; never writes BENCHMARKS.md")
    parser.add_argument("--output", help=output_help)
    parser.add_argument("--markdown", default=BENCHMARKS_MD, help="file whose section a full run rewrites")
    parser.add_argument("--allow_busy", action="store_true",
                        help="publish even if the 1-minute load exceeded half the cores (the section says so)")
    if render_json:
        parser.add_argument("--render_json", help="rewrite the section from the JSON of an earlier full run "
                            "(its --output), without running anything")


def start(args):
    """The load average at the start of a run; a full run on a busy machine stops here, before measuring."""
    load_before = machine.read_load()
    if not args.quick:
        check_quiet(load_before, None, args.allow_busy)
    return load_before


def check_quiet(load_before, load_after, allow_busy, core_count=None):
    """Raise BenchmarkError when a reading shows a busy machine and --allow_busy was not given.

    Args:
      load_before, load_after: (1, 5, 15)-minute load averages at the start and end (or None: unknown).
      allow_busy: publish anyway.
      core_count: defaults to this machine's.
    Returns:
      True when the machine was busy (and allowed), False when quiet.
    """
    core_count = core_count or machine.cores()
    readings = machine.busy_readings(load_before, load_after, core_count)
    if readings and not allow_busy:
        raise BenchmarkError("the machine is busy (%s); BENCHMARKS.md was not written. Rerun when it is "
                             "quiet, or pass --allow_busy to publish figures marked as measured on a busy "
                             "machine" % machine.busy_message(readings, core_count))
    return bool(readings)


def publish(name, body, markdown, load_before, load_after, allow_busy):
    """Check the machine was quiet (check_quiet), then replace section `name` of `markdown` with `body`."""
    check_quiet(load_before, load_after, allow_busy)
    write_section(name, body, markdown)


def render_saved(args, name, render):
    """--render_json: section `name` rewritten by render(payload, command) from an earlier full run's results file,
    nothing run; returns that payload."""
    payload = load_full_run(args.render_json)
    publish(name, render(payload, payload.get("command", "(not recorded)")), args.markdown, payload["load_before"],
            payload["machine"]["load_average"], args.allow_busy)
    return payload


def save_and_publish(args, name, payload, render):
    """A run's end: its results JSON written (results_path), and after a full run section `name` rewritten by
    render(payload, payload["command"]) under the quiet-machine rule (publish)."""
    write_json(results_path(args, name), payload)
    if not args.quick:
        publish(name, render(payload, payload["command"]), args.markdown, payload["load_before"],
                payload["machine"]["load_average"], args.allow_busy)


def check_run(done, what):
    """Stop the benchmark when the subprocess run `done` (a subprocess.CompletedProcess with text stderr) failed.

    A run that refused with its one `error:` line and exit status 2 (bad input, a run directory in use) becomes a
    BenchmarkError naming `what` and that line; any other failure (a crash: a bug) raises RuntimeError with the
    tail of its stderr.
    """
    if done.returncode == 0:
        return
    errors = [line for line in done.stderr.splitlines() if line.lower().startswith("error: ")]
    if done.returncode == 2 and errors:
        raise BenchmarkError("%s refused: %s" % (what, errors[-1][len("error: "):]))
    raise RuntimeError("%s failed:\n%s" % (what, done.stderr[-3000:]))


def run_main(main):
    """Call main(); a BenchmarkError becomes one `error:` line on stderr and exit status 2."""
    try:
        main()
    except BenchmarkError as exc:
        print("error: %s" % exc, file=sys.stderr)
        sys.exit(2)


def results_path(args, section):
    """Where a run's results JSON goes: --output, else benchmarks/results/<section>.json for a full run
    (so the file always matches the section it rendered), nowhere for a --quick run without --output."""
    if args.output:
        return args.output
    return None if args.quick else os.path.join(RESULTS_DIR, section + ".json")


def repo_relative(path):
    """`path` relative to the repository's root when it lies inside it (the same in every clone), else absolute."""
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, REPO_ROOT]) == REPO_ROOT
    return os.path.relpath(path, REPO_ROOT) if inside else path


def write_json(path, payload):
    """Write payload as indented, key-sorted JSON to `path` atomically (nothing if path is empty)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_atomically(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def load_json(path):
    """A results JSON file, strictly parsed; problems are BenchmarkErrors naming the path."""
    return files.load_json_file(path, BenchmarkError, "results file")


def load_full_run(path):
    """The JSON a full run wrote (for --render_json); a --quick run's JSON is refused."""
    payload = load_json(path)
    if payload.get("quick"):
        raise BenchmarkError("--render_json=%s is from a --quick run; expected a full run's results" % path)
    return payload


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock named after `path` (for a read-modify-write of a file other runs also write)."""
    # Kept outside the repository and never deleted: deleting a lock file races with its next user.
    lock_path = os.path.join(tempfile.gettempdir(), "tfquant-benchmarks-%s.lock"
                             % hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12])
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_section(name, body, path=BENCHMARKS_MD):
    """Replace the text between <!-- BEGIN name --> and <!-- END name --> in `path` with `body`.

    Other sections stay byte for byte; a missing file or section is created (sections appended).
    """
    begin, end = "<!-- BEGIN %s -->" % name, "<!-- END %s -->" % name
    block = "%s\n%s\n%s" % (begin, body.strip("\n"), end)
    # Benchmarks may finish at the same time; the lock keeps one from dropping another's section.
    with locked(path):
        text = _read_or_new(path)
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            # A function replacement, so backslashes in the body are never read as group references.
            text = pattern.sub(lambda _: block, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        files.write_atomically(path, text if text.endswith("\n") else text + "\n")


def _read_or_new(path):
    if os.path.exists(path):
        with open(path) as handle:
            return handle.read()
    return ("# tfquant benchmarks\n\nEach section is written by the command it shows, run from the repository "
            "root.\n")


def command_line(argv=None):
    """The command that reproduces this run: `.venv/bin/python -m benchmarks.<script> <args>`."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.relpath(os.path.abspath(argv[0]), REPO_ROOT)
    module = os.path.splitext(script)[0].replace(os.sep, ".")
    return " ".join([".venv/bin/python", "-m", module] + argv[1:])


def markdown_table(header, rows):
    """A markdown table of `header` and `rows` (cells formatted with str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    return "\n".join(lines)
