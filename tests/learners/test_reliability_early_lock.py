"""A second process on a held run directory is refused before it imports TensorFlow (issue 30's < 2 s target).

The processes under test run with a `tensorflow` package first on their path whose import fails with a marker
line: a refusal that shows no marker (and exits 2 with the one in-use line) happened before TensorFlow's import,
which is what makes it fast whatever the load; a run that goes on shows the marker. The holder is this test
process or a helper process, both holding it with tfquant.files.lock_directory (which run scripts call before
TensorFlow's import).
"""
import os
import subprocess
import sys
import time

import pytest

from learners import early_lock
from tests.learners.test_end_to_end import ROOT
from tfquant import files

SCRIPT = os.path.join(ROOT, "nets", "convnet_at_fmnist_run.py")
MARKER = "tensorflow imported before the lock was decided"


@pytest.fixture(scope="module")
def no_tensorflow(tmp_path_factory):
    """A PYTHONPATH entry whose `tensorflow` package refuses to import."""
    fake = tmp_path_factory.mktemp("no_tensorflow")
    (fake / "tensorflow").mkdir()
    (fake / "tensorflow" / "__init__.py").write_text("raise ImportError(%r)\n" % MARKER)
    return str(fake)


def _run(command, cwd, pythonpath, environ=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=pythonpath)
    env.pop("TF_CONFIG", None)
    env.update(environ or {})
    started = time.time()
    result = subprocess.run(command, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=300)
    return result, time.time() - started


def _refused_line(result):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert MARKER not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def _run_message(directory, pid):
    return ("error: run directory %s is in use by process %d (lock %s); expected one process per run directory: "
            "wait for it to end, or choose another --save_path / --uql_save_quant_model_path"
            % (directory, pid, os.path.join(directory, files.LOCK_NAME)))


@pytest.fixture
def held(tmp_path):
    """tmp_path/models and tmp_path/models_uql, held by this test process through tfquant.files."""
    directories = [str(tmp_path / "models"), str(tmp_path / "models_uql")]
    for directory in directories:
        files.lock_directory(directory)
    yield directories
    for directory in directories:
        files.release_directory(directory)


@pytest.mark.parametrize("args", [
    [], ["--save_path=models/model.ckpt"], ["--save_path", "models/model.ckpt"], ["-save_path=models/model.ckpt"],
    ["--batch_size", "32", "--save_path", "./models/m"], ["--flagfile=flags.txt"],
    ["--learner=uniform", "--save_path=elsewhere/model.ckpt"],
    ["--learner=ptq", "--exec_mode=export", "--save_path=elsewhere/model.ckpt", "--export_dir=out"],
])
def test_run_script_is_refused_before_importing_tensorflow(args, held, tmp_path, no_tensorflow):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "flags.txt").write_text("--learner=full-prec\n--save_path=models/model.ckpt\n")
    listing = sorted(os.listdir(tmp_path / "models"))
    result, seconds = _run([sys.executable, SCRIPT] + args, tmp_path, no_tensorflow + os.pathsep + ROOT)
    directory = held[1] if "--learner=ptq" in args or "--learner=uniform" in args else held[0]
    assert _refused_line(result) == _run_message(directory, os.getpid())
    assert result.stdout == ""
    assert sorted(os.listdir(tmp_path / "models")) == listing  # nothing written
    assert (tmp_path / "models" / files.LOCK_NAME).read_text().strip() == str(os.getpid())  # the holder's pid kept
    print("\nrefused %.2f s after the start (%s)" % (seconds, " ".join(args) or "defaults"))


ALL_SCRIPTS = sorted(name for name in os.listdir(os.path.join(ROOT, "nets")) if name.endswith("_run.py"))


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_every_run_script_is_refused_before_importing_tensorflow(script, held, tmp_path, no_tensorflow):
    # Each script is only its path set-up and learners.launch.main: none of them imports a module that imports
    # TensorFlow before the lock (the ILSVRC-12 scripts once imported learners.flags, and so TensorFlow, first).
    result, _ = _run([sys.executable, os.path.join(ROOT, "nets", script)], tmp_path, no_tensorflow + os.pathsep + ROOT)
    assert _refused_line(result) == _run_message(held[0], os.getpid())
    assert result.stdout == ""


@pytest.mark.parametrize("args, environ", [
    (["--exec_mode=eval"], {}),  # evaluation writes no checkpoint: it takes no lock
    (["--save_path=free/model.ckpt"], {}),  # another directory
    (["--learner=bogus"], {}),  # a bad flag value: the real parse reports it, after the import
    ([], {"TF_CONFIG": '{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", '
                       '"index": 1}}'}),  # not the chief: only the chief locks
])
def test_runs_that_take_no_lock_reach_tensorflow(args, environ, held, tmp_path, no_tensorflow):
    (tmp_path / "free").mkdir()
    result, _ = _run([sys.executable, SCRIPT] + args, tmp_path, no_tensorflow + os.pathsep + ROOT, environ)
    assert result.returncode != 0 and MARKER in result.stderr, result.stderr[-3000:]


def test_the_early_parse_follows_absl_and_leaves_bad_values_alone(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "q").mkdir()
    (tmp_path / "flags.txt").write_text("--save_path=%s\n" % (tmp_path / "q" / "m"))
    chief = {"TF_CONFIG": '{"cluster": {"worker": ["h:1", "h:2"]}, "task": {"type": "worker", "index": 0}}'}
    other = {"TF_CONFIG": '{"cluster": {"worker": ["h:1", "h:2"]}, "task": {"type": "worker", "index": 1}}'}
    a, q = str(tmp_path / "a" / "m"), str(tmp_path / "q" / "m")
    found = early_lock.directories_to_lock
    assert found(["--save_path", a], {}) == [(str(tmp_path / "a"), False)]
    assert found(["--save_path=%s" % a, "--save_path=%s" % q], {}) == [(str(tmp_path / "q"), False)]  # the last one
    assert found(["--flagfile=%s" % (tmp_path / "flags.txt")], {}) == [(str(tmp_path / "q"), False)]
    # Fine-tuning reads the float directory (shared) and writes the quantized one.
    assert found(["--learner=uniform", "--save_path=" + a, "--uql_save_quant_model_path=" + q], chief) == [
        (str(tmp_path / "a"), True), (str(tmp_path / "q"), False)]
    assert found(["--learner=ptq", "--save_path=" + a, "--uql_save_quant_model_path=" + a + "_quant"], {}) == [
        (str(tmp_path / "a"), False)]  # one directory for both: held exclusively
    assert found(["--learner=uniform", "--exec_mode=export", "--save_path=" + a, "--uql_save_quant_model_path=" + q],
                 {}) == [(str(tmp_path / "q"), False)]
    assert found(["--save_path=" + str(tmp_path / "missing" / "m")], {}) == []  # nothing there to protect yet
    for args, environ in ((["--save_path=" + a, "--learner=bogus"], {}), (["--save_path=" + a, "--save_path"], {}),
                          (["--save_path=" + a, "--exec_mode=eval"], {}), (["--save_path=" + a], other),
                          (["--save_path=" + a], {"TF_CONFIG": "{not json"})):
        assert found(args, environ) == [], args


def test_a_run_reuses_the_lock_it_took_early(tmp_path):
    # The directory exists: the run locks it before TensorFlow, then runner's lock of the same directory must find
    # it held (not refuse this very process) and go on to the next check, the data.
    (tmp_path / "models").mkdir()
    result, _ = _run([sys.executable, SCRIPT, "--train_subset=16", "--batch_size=32"], tmp_path, ROOT)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: only 16 training examples, fewer than one batch of 32"], result.stderr[-3000:]
    # It wrote its own pid there, early (before the data check that stopped it).
    pid = (tmp_path / "models" / files.LOCK_NAME).read_text().strip()
    assert pid.isdigit() and int(pid) != os.getpid()


def test_export_command_is_refused_before_importing_tensorflow(tmp_path, no_tensorflow):
    # The holder is another process that took the lock as a run script's early lock does.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tfquant import files; files.lock_directory(sys.argv[1]); "
         "print('held', flush=True); time.sleep(300)", str(run_dir)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "held"
        command = [sys.executable, "-m", "tfquant.export", "--checkpoint_dir", "run", "--output_dir", "out"]
        result, seconds = _run(command, tmp_path, no_tensorflow + os.pathsep + ROOT)
        assert _refused_line(result) == (
            "error: checkpoint_dir=run is in use by process %d (lock %s); expected one process per run directory: "
            "wait for it to end" % (holder.pid, run_dir / files.LOCK_NAME))
        assert not (tmp_path / "out").exists()
        print("\nexport refused %.2f s after the start" % seconds)
        # A malformed command line is refused before the import too, by the command's own parser.
        result, _ = _run(command + ["--eval_subset=0"], tmp_path, no_tensorflow + os.pathsep + ROOT)
        assert _refused_line(result) == "error: --eval_subset=0 is not valid; expected an integer >= 1"
        assert holder.poll() is None  # the holder is unaffected
    finally:
        holder.kill()
        holder.wait()
    # Held by nobody now: the same command goes on to import TensorFlow.
    result, _ = _run(command, tmp_path, no_tensorflow + os.pathsep + ROOT)
    assert result.returncode != 0 and MARKER in result.stderr, result.stderr[-3000:]
