"""Chaos test: a small run killed with SIGKILL at random points, resumed each time, ends as an uninterrupted one.

One uninterrupted reference job (train, evaluate, export: each a run-script process) is run first, counting
the lines and seconds of each phase. Then the same job runs in another directory, and each phase is started
again and again and killed with SIGKILL at a random point (after a random number of its progress lines plus up
to 0.5 s, or after a random time within the phase's length), so the kills land in start-up, training steps,
checkpoint saves, evaluation, report writing and export; then it is run once more to the end.
Compared with the reference: the latest checkpoint of every prefix (every variable, bit for bit), every
printed accuracy line, the exported files byte for byte (export.json without its latency measurement), and the
work each kill lost (the last step printed before it against the step the next run resumed from: at most the
save interval).

  .venv/bin/python -m benchmarks.chaos                 # full run (uniform learner, >= 20 kills), BENCHMARKS.md
  .venv/bin/python -m benchmarks.chaos --quick         # float learner, 2 kills (the tests run this)
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks import publish

SECTION = "chaos"
SCRIPT = os.path.join(publish.REPO_ROOT, "nets", "convnet_at_fmnist_run.py")
QUICK = dict(flags=["--learner=full-prec", "--train_subset=64", "--eval_subset=64", "--batch_size=16",
                    "--batch_size_eval=32", "--nb_epochs_rat=0.5", "--summ_step=1", "--save_step=2",
                    "--lrn_rate_init=0.01"],
             phases=[("train", []), ("eval", ["--exec_mode=eval"])], kills={"train": 1, "eval": 1},
             prefixes=["models/model.ckpt"], save_step=2,
             # Lines the phases print (6 steps, the saved line; the accuracy line): the kill points' range.
             lines={"train": 7, "eval": 1}, seconds={"train": 12.0, "eval": 10.0})
FULL = dict(flags=["--learner=uniform", "--train_subset=256", "--eval_subset=256", "--batch_size=32",
                   "--batch_size_eval=64", "--nb_epochs_rat=0.83", "--uql_quant_epochs=2.5", "--summ_step=1",
                   "--save_step=5", "--lrn_rate_init=0.01", "--uql_activation_bits=8"],
            phases=[("train", []), ("eval", ["--exec_mode=eval"]), ("export", ["--exec_mode=export",
                                                                              "--export_dir=export"])],
            kills={"train": 14, "eval": 4, "export": 6}, prefixes=["models/model.ckpt", "models_uql/model.ckpt"],
            save_step=5)
ITER = re.compile(r"^(full-prec|uniform) iter (\d+)/(\d+) ")
RESUMED = re.compile(r"^(full-prec|uniform): resuming from \S+ at step (\d+) of \d+")


class _Process:
    """A run-script process whose stdout lines are collected by a thread, each with its arrival time."""

    def __init__(self, args, cwd):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=publish.REPO_ROOT)
        self.started = time.time()
        self.popen = subprocess.Popen([sys.executable, SCRIPT] + args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self.lines, self.times, self.stderr = [], [], []
        self._readers = [threading.Thread(target=self._read, args=(self.popen.stdout, True)),
                         threading.Thread(target=self._read, args=(self.popen.stderr, False))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, is_stdout):
        for line in stream:
            if is_stdout:
                self.lines.append(line.rstrip("\n"))
                self.times.append(time.time() - self.started)
            else:
                self.stderr.append(line.rstrip("\n"))

    def wait(self, timeout=None):
        """The exit status (None if still running after `timeout` seconds)."""
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for reader in self._readers:
            reader.join()
        return status

    def kill(self):
        self.popen.send_signal(signal.SIGKILL)
        return self.wait()


def _run_to_end(args, cwd, what):
    process = _Process(args, cwd)
    status = process.wait(1800)
    if status != 0:
        raise publish.BenchmarkError("%s ended with status %s: %s" % (what, status, " | ".join(process.stderr[-3:])))
    return process


def _where(lines, save_step):
    """Where a killed process was, from the last line it printed."""
    if not lines:
        return "start-up (nothing printed)"
    last = lines[-1]
    found = ITER.match(last)
    if found:
        step, total = int(found.group(2)), int(found.group(3))
        saving = step % save_step == 0 or step == total
        return "%s step %d%s" % (found.group(1), step, ", saving its checkpoint" if saving else "")
    return "after '%s'" % (last if len(last) < 60 else last[:57] + "...")


def _accuracy_lines(lines, directory):
    """The lines that report an accuracy, with the run's own directory written as <run>."""
    return [line.replace(directory, "<run>") for line in lines if "accuracy" in line and "iter " not in line]


def _checkpoint_values(directory, prefix):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  (imported once the runs are done)
    from tfquant import checkpoints  # pylint: disable=import-outside-toplevel
    path, step, _ = checkpoints.latest_valid_checkpoint(os.path.join(directory, prefix))
    reader = tf.train.load_checkpoint(path)
    return step, {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _export_files(directory):
    export = os.path.join(directory, "export")
    contents = {}
    for name in sorted(os.listdir(export)) if os.path.isdir(export) else []:
        with open(os.path.join(export, name), "rb") as handle:
            data = handle.read()
        if name == "export.json":
            # Latency is a measurement of this run, not a property of the export; paths name the directory.
            record = json.loads(data.decode())
            record.pop("latency", None)
            data = json.dumps(record, sort_keys=True).replace(directory, "<run>").encode()
        contents[name] = data
    return contents


def _reference(mode, directory, into, seconds):
    """Run every phase of the job once, uninterrupted; `into[phase]` receives its stdout lines, `seconds` its time."""
    for phase, extra in mode["phases"]:
        started = time.time()
        into[phase] = _run_to_end(mode["flags"] + extra, directory, "reference %s" % phase).lines
        seconds[phase] = time.time() - started


def _kill_at_random_point(process, rng, expected_lines, expected_seconds):
    """SIGKILL `process` after a random number of its stdout lines and a random delay up to 0.5 s, or (drawn as
    line 0) after a random time up to `expected_seconds`: start-up, or work that prints nothing (evaluation, export).

    Returns False when it ended first."""
    wanted = rng.randint(0, max(expected_lines - 1, 0))
    deadline = time.time() + 1800
    while len(process.lines) < wanted and process.popen.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    delay = rng.uniform(0.0, expected_seconds) if wanted == 0 else rng.uniform(0.0, 0.5)
    if process.wait(delay) is not None:
        return False
    process.kill()
    return True


def run_chaos(mode, workdir, seed):
    """Run the reference and the killed job in `workdir`; returns the results dict.

    A full run runs the reference first and kills after a random number of the lines each phase printed there;
    a quick run runs the reference beside the killed job (two processes at a time) with expected line counts.
    """
    rng = random.Random(seed)
    reference_dir, chaos_dir = os.path.join(workdir, "reference"), os.path.join(workdir, "chaos")
    for directory in (reference_dir, chaos_dir):
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
    reference, seconds = {}, {}
    beside = None
    if mode.get("lines"):
        beside = threading.Thread(target=_reference, args=(mode, reference_dir, reference, seconds))
        beside.start()
        expected, expected_seconds = mode["lines"], mode["seconds"]
    else:
        _reference(mode, reference_dir, reference, seconds)
        expected = {phase: len(lines) for phase, lines in reference.items()}
        expected_seconds = seconds
    kills, finals = [], {}
    try:
        for phase, extra in mode["phases"]:
            budget = mode["kills"].get(phase, 0)
            attempts = []  # stdout lines of each killed process of this phase, then of the final one
            while budget > 0:
                process = _Process(mode["flags"] + extra, chaos_dir)
                # A resumed run prints only what is left: the kill point is drawn among the lines still to come.
                left = expected[phase] - _progress(reference.get(phase) if beside is None else None, attempts)
                if not _kill_at_random_point(process, rng, left, expected_seconds[phase]):
                    if process.popen.returncode != 0:
                        raise publish.BenchmarkError("chaos %s ended with status %d: %s" % (
                            phase, process.popen.returncode, " | ".join(process.stderr[-3:])))
                    continue  # finished before its kill: again (rerunning a finished phase has kill points too)
                budget -= 1
                attempts.append(process.lines)
                kills.append(dict(phase=phase, seconds=round(time.time() - process.started, 2),
                                  where=_where(process.lines, mode["save_step"]), last_step=_last_steps(process.lines)))
            final = _run_to_end(mode["flags"] + extra, chaos_dir, "chaos %s after its kills" % phase)
            finals[phase] = final.lines
            attempts.append(final.lines)
            phase_kills = kills[len(kills) - len(attempts) + 1:]
            for index, kill in enumerate(phase_kills):
                kill["lost_steps"] = _lost_steps(kill["last_step"], attempts[index + 1:])
    finally:
        if beside is not None:
            beside.join()
    if set(reference) != {phase for phase, _ in mode["phases"]}:
        raise publish.BenchmarkError("the reference run did not finish every phase")
    return _compare(mode, reference_dir, chaos_dir, reference, finals, kills)


def _progress(reference_lines, attempts):
    """How many of the reference's lines the killed attempts got past: up to its last training step they printed
    (0 without the reference's lines)."""
    seen = {(m.group(1), m.group(2)) for lines in attempts for m in map(ITER.match, lines) if m}
    done = 0
    for index, line in enumerate(reference_lines or []):
        found = ITER.match(line)
        if found and (found.group(1), found.group(2)) in seen:
            done = index + 1
    return done


def _last_steps(lines):
    """{learner: the last training step it printed} of one process's lines."""
    steps = {}
    for line in lines:
        found = ITER.match(line)
        if found:
            steps[found.group(1)] = int(found.group(2))
    return steps


def _lost_steps(last_steps, successors):
    """Steps a kill cost: per learner, the last step printed before it minus the step a later run went on from.

    The first later process that says anything about a learner decides: 'resuming from ... at step M' (M), or
    training lines from step 1 (0: it started over). A learner no later process trains again had finished.
    """
    lost = 0
    for name, last in last_steps.items():
        for lines in successors:
            resumed = [int(m.group(2)) for m in map(RESUMED.match, lines) if m and m.group(1) == name]
            trained = [int(m.group(2)) for m in map(ITER.match, lines) if m and m.group(1) == name]
            if resumed or trained:
                lost = max(lost, last - (resumed[0] if resumed else trained[0] - 1))
                break
    return lost


def _compare(mode, reference_dir, chaos_dir, reference, finals, kills):
    differences = []
    compared = 0
    for prefix in mode["prefixes"]:
        want_step, want = _checkpoint_values(reference_dir, prefix)
        got_step, got = _checkpoint_values(chaos_dir, prefix)
        if want_step != got_step or sorted(want) != sorted(got):
            differences.append("%s: step %s vs %s, variables %d vs %d" % (prefix, got_step, want_step, len(got),
                                                                         len(want)))
            continue
        for name in want:
            compared += 1
            # np.asarray: the record of quantization decisions is a string variable (bytes), the rest arrays.
            want_value, got_value = np.asarray(want[name]), np.asarray(got[name])
            if want_value.dtype != got_value.dtype or not np.array_equal(want_value, got_value):
                differences.append("%s: variable %s differs" % (prefix, name))
    accuracy = {}
    for phase, _ in mode["phases"]:
        want = _accuracy_lines(reference[phase], reference_dir)
        got = _accuracy_lines(finals[phase], chaos_dir)
        accuracy[phase] = got
        if want != got:
            differences.append("%s accuracy lines differ: %s vs %s" % (phase, got, want))
    want_files, got_files = _export_files(reference_dir), _export_files(chaos_dir)
    for name in sorted(set(want_files) | set(got_files)):
        if want_files.get(name) != got_files.get(name):
            differences.append("export file %s differs" % name)
    lost_beyond = [k for k in kills if k["lost_steps"] > mode["save_step"]]
    return dict(kills=kills, kill_points=len(kills), variables_compared=compared, differences=differences,
                accuracy_lines=accuracy, export_files=sorted(got_files), save_step=mode["save_step"],
                lost_beyond_save_interval=len(lost_beyond))


def summary_lines(result):
    """What the script prints: one line per kill, then the verdict."""
    lines = []
    for number, kill in enumerate(result["kills"], 1):
        lines.append("kill %2d: %-6s after %6.2f s, at %s; steps lost %d" % (number, kill["phase"], kill["seconds"],
                                                                            kill["where"], kill["lost_steps"]))
    for phase, accuracy in result["accuracy_lines"].items():
        lines.extend("%s: %s" % (phase, line) for line in accuracy)
    lines.append("kill points: %d; lost beyond the save interval (%d steps): %d; variables compared: %d; "
                 "export files compared: %d; differences from the uninterrupted run: %d"
                 % (result["kill_points"], result["save_step"], result["lost_beyond_save_interval"],
                    result["variables_compared"], len(result["export_files"]), len(result["differences"])))
    lines.extend("difference: %s" % d for d in result["differences"])
    return lines


def main(argv=None):
    """Parse the flags, run, print, and (full runs) write the BENCHMARKS.md section; exit 1 on a difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    publish.add_arguments(parser, render_json=False)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a new temporary directory)")
    parser.add_argument("--kills", type=int, default=None, help="full run: kill points in all (default 24), a quarter "
                        "each in evaluation and export, the rest in training")
    args = parser.parse_args(argv)
    mode = dict(QUICK if args.quick else FULL)
    if args.kills is not None:
        if args.quick or args.kills < 3:
            parser.error("--kills is valid only without --quick, with at least 3 (one per phase)")
        others = max(1, args.kills // 4)
        mode["kills"] = {"train": args.kills - 2 * others, "eval": others, "export": others}
    load_before = publish.start(args)
    workdir = args.workdir or tempfile.mkdtemp(prefix="tfquant-chaos-")
    started = time.time()
    result = run_chaos(mode, workdir, args.seed)
    result.update(quick=args.quick, seconds=round(time.time() - started, 1), workdir=workdir)
    lines = summary_lines(result)
    print("\n".join(lines + ["work directory: %s (%.0f s)" % (workdir, result["seconds"])]))
    publish.write_json(publish.results_path(args, SECTION), result)
    if not args.quick:
        body = ("Command: `%s` (%.0f s)\n\n```\n%s\n```" % (publish.command_line(), result["seconds"], "\n".join(lines)))
        publish.publish(SECTION, body, args.markdown, load_before, publish.machine.read_load(), args.allow_busy)
    if result["differences"] or result["lost_beyond_save_interval"]:
        sys.exit(1)


if __name__ == "__main__":
    publish.run_main(main)
