"""Regenerate every table of BENCHMARKS.md in one command: each benchmark's own publish path, in order.

Each part runs `python -m benchmarks.<module> ...` as a subprocess, exactly the command its section shows; the
timing benchmarks run first (they need the quiet machine most), then the accuracy tables and the tables built on
their checkpoints. A part that fails stops the run with one `error:` line (the sections already written stay);
nothing starts on a busy machine (1-minute load above 1.0 per core) unless --allow_busy, which is also passed to
every part (its section then says so).

  .venv/bin/python -m benchmarks.run_all --list                      # parts, sections and how long each takes
  .venv/bin/python -m benchmarks.run_all --skip_long                 # the timing tables (~1 h)
  .venv/bin/python -m benchmarks.run_all --only rewrite_cost,train_overhead
  .venv/bin/python -m benchmarks.run_all                             # everything (about a day)
  .venv/bin/python -m benchmarks.run_all --quick --only memory,allreduce   # the dry mode the tests run

--quick is a dry run that measures nothing worth publishing: every chosen part runs its own --quick mode, and each
part that can render its section from a results file rewrites it, from the committed benchmarks/results JSON, in a
temporary copy of BENCHMARKS.md whose sections were blanked first; the run checks every such section came back.
BENCHMARKS.md itself is never written by --quick.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import typing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(REPO_ROOT, "BENCHMARKS.md")
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
BUSY_LOAD_PER_CORE = 1.0
BLANK = "(blanked by benchmarks.run_all --quick; the part's publish path did not rewrite it)"


class RunAllError(Exception):
    """A bad flag, a busy machine or a failed part: one `error:` line, exit status 2."""


class Part(typing.NamedTuple):
    """One benchmark command and the BENCHMARKS.md sections it writes.

    full: arguments after `-m benchmarks.<module>` of the publishing run ({work} is --work_dir).
    quick: arguments of its --quick smoke run ({tmp}: a temporary directory of the dry run).
    minutes: roughly how long the full run takes on the 2-core machine: the sum of the run seconds its results
      file records where it records them (accuracy_table, bit_allocation, keras_ptq, multi_worker_accuracy,
      chaos), else an estimate from the schedule.
    long: an accuracy run of an hour or more (left out by --skip_long).
    render: its sections can be rendered from a results file (--render_json), which --quick checks.
    allow_busy: the module takes --allow_busy (one that publishes nothing does not).
    """

    name: str
    module: str
    sections: typing.Tuple[str, ...]
    full: typing.Tuple[str, ...]
    quick: typing.Tuple[str, ...]
    minutes: float
    long: bool = False
    render: bool = True
    allow_busy: bool = True


# Timing first (quiet machine, no training in the background), then the accuracy tables, then the tables that
# export or reuse the accuracy table's checkpoints (export_table reads accuracy_table's --work_dir).
PARTS = (
    Part("rewrite_cost", "rewrite_cost", ("rewrite_cost",), (), ("--quick",), 3),
    Part("train_overhead", "train_overhead", ("train_overhead",), ("--rounds", "12", "--steps", "3"), ("--quick",),
         15),
    Part("memory", "memory", ("memory",), (), ("--quick",), 4),
    Part("allreduce", "allreduce", ("allreduce",), (), ("--quick",), 2),
    Part("scale", "scale", ("scale",), ("--steps", "5", "--warmup", "2", "--repeats", "1"), ("--quick",), 20,
         render=False),
    Part("chaos", "chaos", ("chaos",), ("--workdir", "{work}/chaos"), ("--quick", "--workdir", "{tmp}/chaos"), 5,
         render=False),
    Part("baselines", "baselines", ("float_baselines",), ("--cache_dir", "{work}/baselines", "--seeds", "0,1,2"),
         ("--quick", "--cache_dir", "{tmp}/baselines"), 280, long=True, render=False, allow_busy=False),
    Part("accuracy_table", "accuracy_table", ("accuracy_table",), ("--seeds", "0,1,2", "--work_dir", "{work}/acc"),
         ("--quick", "--work_dir", "{tmp}/acc"), 460, long=True),
    # Issue 34's table: every row fine-tunes the converged float model of its seed (the baselines part's cache).
    Part("accuracy_converged", "accuracy_table", ("accuracy_converged",),
         ("--baselines", "{work}/baselines", "--rows", "issue34", "--seeds", "0,1,2", "--epochs", "3", "--work_dir",
          "{work}/acc_converged"), ("--quick", "--rows", "W8A8", "--epochs", "0.25", "--work_dir", "{tmp}/accc"), 330,
         long=True, render=False),
    # Issue 34's post-training rows on the accuracy table's float models (their own section and results file).
    Part("ptq_table", "accuracy_table", ("ptq_table",),
         ("--rows", "W4A8 ch PTQ nearest,W4A8 ch PTQ AdaRound", "--seeds", "0,1,2", "--work_dir", "{work}/acc"),
         ("--quick", "--rows", "W4A8 ch PTQ nearest", "--work_dir", "{tmp}/ptq"), 20),
    Part("export_table", "export_table", ("export_table",), ("--work_dir", "{work}/acc"),
         ("--quick", "--work_dir", "{tmp}/acc"), 30, long=True, render=False),
    Part("export_kbit", "export_table", ("export_kbit",), ("--kbit", "--work_dir", "{work}/acc"),
         ("--kbit", "--quick", "--work_dir", "{tmp}/kbit"), 15, render=False),
    Part("keras_ptq", "keras_ptq", ("keras_ptq",), ("--float_dir", "{work}/acc/seed0/float", "--work_dir",
                                                    "{work}/keras_ptq"), ("--quick", "--work_dir", "{tmp}/kptq"), 40,
         long=True),
    Part("bit_allocation", "bit_allocation", ("bit_allocation",), ("--seeds", "0,1,2", "--work_dir", "{work}/alloc"),
         ("--quick", "--work_dir", "{tmp}/alloc"), 320, long=True),
    # Its LSQ rows (issue 31's sensitivity fix against the search before it), on the same float checkpoints.
    Part("bit_allocation_lsq", "bit_allocation", ("bit_allocation",),
         ("--weight_grid", "lsq", "--seeds", "0,1,2", "--work_dir", "{work}/alloc"),
         ("--quick", "--weight_grid", "lsq", "--work_dir", "{tmp}/alloc_lsq"), 40, long=True),
    Part("bit_allocation_timing", "bit_allocation", ("bit_allocation",),
         ("--timing", "--timing_repeats", "3", "--work_dir", "{work}/alloc"),
         ("--timing", "--quick", "--work_dir", "{tmp}/alloc"), 15),
    Part("multi_worker_accuracy", "multi_worker_accuracy", ("multi_worker_accuracy",), ("--work_dir", "{work}/mw"),
         ("--quick", "--work_dir", "{tmp}/mw"), 40, long=True, render=False),
    # MobileNetV2 W4A4 plain vs recipe (issue 35): 3 seeds of a 10-epoch float model, 3 fine-tunings each.
    Part("mobilenet_recipe", "mobilenet_recipe", ("mobilenet_recipe",),
         ("--seeds", "0,1,2", "--work_dir", "{work}/mobilenet_recipe"),
         ("--quick", "--work_dir", "{tmp}/mobilenet_recipe"), 420, long=True, render=False),
    # Transformer W8A8 and W4A8 (issue 35): 3 seeds of the 20-epoch float model (cached; --ratios 1,2,4 doubles it),
    # a 1-epoch fine-tuning per row and one float control.
    Part("transformer_accuracy", "transformer_accuracy", ("transformer_accuracy",),
         ("--seeds", "0,1,2", "--work_dir", "{work}/transformer_accuracy"),
         ("--quick", "--work_dir", "{tmp}/transformer_accuracy"), 60, long=True),
    # Issue 33's stand-in model files (Keras 3, SavedModel, frozen graphs): trained, then uniform W4A8 and ptq W8A8.
    Part("model_files", "model_files", ("model_files",), ("--work_dir", "{work}/model_files"),
         ("--quick", "--work_dir", "{tmp}/model_files"), 45, long=True),
    # Trains its own float ResNet-20 unless {work}/analysis_check/seed0/float holds one, then five W2A2 runs.
    Part("analysis_check", "analysis_check", ("analysis_check",), ("--work_dir", "{work}/analysis_check"),
         ("--quick", "--work_dir", "{tmp}/analysis_check"), 30),
)
# Sections no part rewrites: a record of figures from an earlier machine, kept as it is.
KEPT_SECTIONS = ("accuracy_table_earlier_machine",)


def _format(args, work, tmp):
    return [a.replace("{work}", work).replace("{tmp}", tmp) for a in args]


def part_command(part, work_dir, tmp_dir, quick, allow_busy):
    """The argv of one part (full or quick) run from the repository root."""
    argv = [sys.executable, "-m", "benchmarks." + part.module]
    if quick:
        return argv + _format(part.quick, work_dir, tmp_dir)
    return argv + _format(part.full, work_dir, tmp_dir) + (["--allow_busy"] if allow_busy and part.allow_busy else [])


def render_command(part, results, markdown):
    """The argv that rewrites `part`'s section of `markdown` from a results file, without measuring."""
    # --allow_busy: the stored figures' own load readings decide nothing here; the copy is thrown away.
    return [sys.executable, "-m", "benchmarks." + part.module, "--render_json", results, "--markdown", markdown,
            "--allow_busy"]


def choose(only, skip_long):
    """The parts in run order: all, or the comma-separated `only` names (in PARTS order), minus long ones."""
    parts = list(PARTS)
    if only is not None:
        names = [n.strip() for n in only.split(",")]
        unknown = [n for n in names if n not in {p.name for p in PARTS}]
        if unknown or not [n for n in names if n]:
            raise RunAllError("--only=%s is not valid; expected a comma-separated subset of %s"
                              % (only, ", ".join(p.name for p in PARTS)))
        parts = [p for p in PARTS if p.name in names]
    if skip_long:
        parts = [p for p in parts if not p.long]
    if not parts:
        raise RunAllError("no part left to run (--skip_long removed every part chosen by --only)")
    return parts


def _duration(minutes):
    return "%d min" % minutes if minutes < 90 else "%.0f h" % (minutes / 60)


def listing(parts, work_dir):
    """The --list text: each part, its sections, its rough duration, and the total."""
    lines = ["%-22s %-8s %-5s %-24s %s" % ("part", "takes", "long", "sections", "command")]
    for p in parts:
        lines.append("%-22s %-8s %-5s %-24s python -m benchmarks.%s %s" % (
            p.name, "~" + _duration(p.minutes), "yes" if p.long else "", ",".join(p.sections) or "(none: cache)",
            p.module, " ".join(_format(p.full, work_dir, ""))))
    lines.append("total ~%s alone on the 2-core machine; kept as they are: %s"
                 % (_duration(sum(p.minutes for p in parts)), ", ".join(KEPT_SECTIONS)))
    return "\n".join(lines)


def check_quiet(allow_busy, load=None, core_count=None):
    """Raise RunAllError when the 1-minute load is above BUSY_LOAD_PER_CORE per core (unless allowed)."""
    load = os.getloadavg()[0] if load is None else load
    core_count = core_count or os.cpu_count() or 1
    if load > BUSY_LOAD_PER_CORE * core_count and not allow_busy:
        raise RunAllError("the machine is busy (1-minute load average %.2f on %d cores, above %.1f per core); "
                          "nothing was run. Rerun when it is quiet, or pass --allow_busy (every section then says "
                          "it was measured on a busy machine)" % (load, core_count, BUSY_LOAD_PER_CORE))


def run_part(argv, label):
    """Run one command from the repository root, its output passed through; RunAllError when it fails."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO_ROOT, stdout=None, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(done.stderr)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise RunAllError("part %s failed (exit status %d after %.0f s: %s); stopped, the sections written before "
                          "it are kept. Its last line: %s" % (label, done.returncode, seconds, " ".join(argv[1:]),
                                                              lines[-1] if lines else "(none)"))
    return seconds


def _section_pattern(name):
    return re.compile(r"<!-- BEGIN %s -->\n(.*?)\n?<!-- END %s -->" % (re.escape(name), re.escape(name)), re.S)


def blank_sections(markdown, sections):
    """Replace the body of each of `sections` in the file `markdown` with BLANK."""
    with open(markdown) as handle:
        text = handle.read()
    for name in sections:
        pattern = _section_pattern(name)
        if not pattern.search(text):
            raise RunAllError("%s has no section %s; expected the markers <!-- BEGIN %s --> and <!-- END %s -->"
                              % (markdown, name, name, name))
        text = pattern.sub(lambda _m, n=name: "<!-- BEGIN %s -->\n%s\n<!-- END %s -->" % (n, BLANK, n), text, count=1)
    with open(markdown, "w") as handle:
        handle.write(text)


def unwritten_sections(markdown, sections):
    """The sections of `sections` whose body in `markdown` is still BLANK, empty or missing."""
    with open(markdown) as handle:
        text = handle.read()
    left = []
    for name in sections:
        found = _section_pattern(name).search(text)
        if not found or not found.group(1).strip() or BLANK in found.group(1):
            left.append(name)
    return left


def run(parts, work_dir, allow_busy, out=None):
    """The publishing run: every part in order, its time and the total printed; returns {part: seconds}."""
    out = out or _say
    check_quiet(allow_busy)
    out(listing(parts, work_dir))
    times, start = {}, time.perf_counter()
    for index, part in enumerate(parts, 1):
        argv = part_command(part, work_dir, "", False, allow_busy)
        out("== [%d/%d] %s (~%s): %s" % (index, len(parts), part.name, _duration(part.minutes), " ".join(argv[1:])))
        times[part.name] = run_part(argv, part.name)
        out("== %s done in %.0f s" % (part.name, times[part.name]))
    out("all %d parts done in %.0f s: %s" % (len(parts), time.perf_counter() - start,
                                             ", ".join("%s %.0f s" % kv for kv in times.items())))
    return times


def dry_run(parts, markdown, out=None):
    """--quick: every part's --quick mode, then its sections rendered from the committed results into a blanked
    temporary copy of `markdown`. BENCHMARKS.md is not written.

    Returns:
      (seconds per part, sections rewritten and checked, parts run as a smoke test only (no --render_json, or no
      results file yet), the copy's text at the end).
    """
    out = out or _say
    tmp = tempfile.mkdtemp(prefix="tfquant_run_all_")
    try:
        copy = os.path.join(tmp, "BENCHMARKS.md")
        shutil.copyfile(markdown, copy)
        # Each rendering part rewrites its own sections (two parts may write one section: both are run).
        renders = {p.name: p.sections for p in parts if p.render and all(os.path.exists(_results(s))
                                                                           for s in p.sections)}
        rendered = list(dict.fromkeys(s for sections in renders.values() for s in sections))
        blank_sections(copy, rendered)
        times, start = {}, time.perf_counter()
        for index, part in enumerate(parts, 1):
            argv = part_command(part, os.path.join(tmp, "work"), tmp, True, False)
            out("== [%d/%d] %s --quick: %s" % (index, len(parts), part.name, " ".join(argv[1:])))
            times[part.name] = run_part(argv, part.name + " --quick")
            for section in renders.get(part.name, ()):
                times[part.name] += run_part(render_command(part, _results(section), copy),
                                             part.name + " --render_json")
            out("== %s done in %.1f s" % (part.name, times[part.name]))
        left = unwritten_sections(copy, rendered)
        if left:
            raise RunAllError("the publish path of %s did not rewrite its section in the temporary copy"
                              % ", ".join(left))
        smoke_only = [p.name for p in parts if p.name not in renders]
        out("dry run of %d parts done in %.1f s; sections rewritten from results files: %s%s" % (
            len(parts), time.perf_counter() - start, ", ".join(rendered) or "none",
            "; smoke run only (no --render_json or no results file yet): %s" % ", ".join(smoke_only)
            if smoke_only else ""))
        with open(copy) as handle:
            return times, rendered, smoke_only, handle.read()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _say(line):
    print(line, flush=True)


def _results(section):
    return os.path.join(RESULTS_DIR, section + ".json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the parts, their sections and durations; run none")
    parser.add_argument("--only", help="comma-separated parts to run (see --list), in the usual order")
    parser.add_argument("--skip_long", action="store_true", help="leave out the accuracy runs of an hour or more")
    parser.add_argument("--quick", action="store_true", help="dry run: quick modes and the section check on a "
                        "temporary copy; never writes BENCHMARKS.md")
    parser.add_argument("--allow_busy", action="store_true", help="start on a busy machine, and let every part "
                        "publish (marked as measured on a busy machine)")
    parser.add_argument("--work_dir", default="/tmp/tfquant_run_all", help="checkpoints and logs of the parts")
    parser.add_argument("--markdown", default=BENCHMARKS_MD, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parts = choose(args.only, args.skip_long)
    if args.list:
        print(listing(parts, args.work_dir))
        return None
    if args.quick:
        return dry_run(parts, args.markdown)
    if os.path.abspath(args.markdown) != os.path.abspath(BENCHMARKS_MD):
        raise RunAllError("--markdown is only for --quick: the parts write BENCHMARKS.md")
    return run(parts, args.work_dir, args.allow_busy)


if __name__ == "__main__":
    try:
        main()
    except RunAllError as exc:
        print("error: %s" % exc, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; the sections written before are kept", file=sys.stderr)
        sys.exit(130)
