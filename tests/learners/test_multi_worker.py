"""Multi-worker training: TF_CONFIG parsing, batch sharding, the launcher, and 2 local workers end to end.

The end-to-end runs start 2 worker processes on localhost through tools/launch_workers.py (what
./run_local.sh --nb_workers 2 runs) on a 64-image subset, and check the variables every worker dumped at
its sync checks against each other and against the chief's checkpoint, the chief-only outputs, and a
killed worker stopping the run and the rerun resuming.
"""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from learners import distributed
from learners.errors import UserError
from nets.data import pipeline
from tests.learners.test_end_to_end import ROOT, event_tags
from tools import launch_workers

SCRIPT = os.path.join(ROOT, "nets", "convnet_at_fmnist_run.py")
# 64 images, 2 workers x 4 per batch: 8 steps an epoch; float 3 x 0.5 epochs = 12 steps, quantized 1 epoch = 8.
ARGS = ["--train_subset=64", "--eval_subset=32", "--batch_size=4", "--batch_size_eval=16", "--nb_epochs_rat=0.5",
        "--uql_quant_epochs=1", "--summ_step=2", "--save_step=4", "--uql_activation_bits=8",
        "--collective_timeout_secs=10", "--learner=uniform"]


def _env(dump_dir=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    if dump_dir is not None:
        env[distributed.DUMP_ENV] = str(dump_dir)
    return env


def _launch(cwd, args, dump_dir=None, count=2):
    """Run the launcher with `count` workers in cwd; returns the CompletedProcess."""
    command = [sys.executable, os.path.join(ROOT, "tools", "launch_workers.py"), SCRIPT,
               "--nb_workers=%d" % count] + args
    return subprocess.run(command, cwd=str(cwd), env=_env(dump_dir), capture_output=True, text=True, timeout=400)


def _checkpoint_values(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


# --- TF_CONFIG -----------------------------------------------------------------------------------------------

def test_parse_tf_config_reads_workers_and_index():
    cluster = distributed.parse_tf_config(launch_workers.tf_config(["localhost:1234", "host2:99"], 1))
    assert cluster.workers == ["localhost:1234", "host2:99"]
    assert cluster.task_index == 1 and cluster.nb_workers == 2 and not cluster.is_chief


@pytest.mark.parametrize("text, part", [
    ("{", "not valid JSON"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}', "cluster jobs"),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', "distinct host:port"),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', "distinct host:port"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "index in 0..1"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}}', "type worker"),
    ('{"task": {"type": "worker", "index": 0}}', "has no cluster"),
])
def test_parse_tf_config_refuses_bad_configs(text, part):
    with pytest.raises(UserError) as info:
        distributed.parse_tf_config(text)
    assert str(info.value).startswith("TF_CONFIG=") and part in str(info.value)


# --- sharding ------------------------------------------------------------------------------------------------

def _index_batches(count, batch, index, nb_workers, skip=0, take=6):
    """Batches of example indices (labels = indices) worker `index` reads from a seeded stream."""
    images = np.zeros([count, 2, 2], np.uint8)
    labels = np.arange(count)
    with tf.Graph().as_default():
        dataset = pipeline.make_train_dataset(images, labels, batch * nb_workers, lambda x, y: (x, y), seed=3,
                                              skip_batches=skip)
        dataset = pipeline.shard_batches(dataset, index, nb_workers)
        element = tf.compat.v1.data.make_one_shot_iterator(dataset.take(take)).get_next()
        with tf.compat.v1.Session() as sess:
            return [sess.run(element)[1] for _ in range(take)]


def test_shards_are_disjoint_parts_of_every_global_batch():
    # 24 examples, 2 workers x 4: 3 steps an epoch, 2 epochs.
    worker0, worker1 = (_index_batches(24, 4, index, 2) for index in (0, 1))
    unsharded = _index_batches(24, 8, 0, 1)
    for step in range(6):
        assert len(worker0[step]) == len(worker1[step]) == 4
        np.testing.assert_array_equal(np.concatenate([worker0[step], worker1[step]]), unsharded[step])
    for epoch in range(2):
        seen = np.concatenate(worker0[3 * epoch:3 * epoch + 3] + worker1[3 * epoch:3 * epoch + 3])
        assert sorted(seen.tolist()) == list(range(24))  # each example exactly once per epoch, over both workers
    # Resuming at step 4 (global batches) gives each worker the batches it would have read.
    resumed = _index_batches(24, 4, 1, 2, skip=4, take=2)
    np.testing.assert_array_equal(np.stack(resumed), np.stack(worker1[4:6]))


# --- the launcher --------------------------------------------------------------------------------------------

def test_launcher_prefixes_output_and_stops_all_when_one_fails(capfd, tmp_path):
    # Worker 1 fails once worker 0 has printed (on a busy machine worker 0 may start late); worker 0 would then
    # sleep for 5 minutes unless the launcher stops it.
    printed = tmp_path / "worker0_printed"
    code = ("import json, os, sys, time; c = json.loads(os.environ['TF_CONFIG']); i = c['task']['index']; "
            "print('index', i, 'of', len(c['cluster']['worker']), sys.argv[1:]); sys.stdout.flush(); "
            "done = %r; deadline = time.time() + 60\n"
            "if i == 0: open(done, 'w').close(); time.sleep(300)\n"
            "while not os.path.exists(done) and time.time() < deadline: time.sleep(0.05)\n"
            "sys.exit(3)" % str(printed))
    start = time.time()
    status = launch_workers.launch([sys.executable, "-c", code], 2)
    assert status == 3
    assert time.time() - start < 60
    out = capfd.readouterr().out.splitlines()
    assert "[worker 0] index 0 of 2 ['--nb_workers=2']" in out
    assert "[worker 1] index 1 of 2 ['--nb_workers=2']" in out


def test_launcher_nb_workers_argument():
    assert launch_workers.parse_nb_workers(["a.py", "--nb_workers", "3", "--x=1"]) == (3, ["a.py", "--x=1"])
    assert launch_workers.parse_nb_workers(["a.py", "--nb_workers=2"]) == (2, ["a.py"])
    with pytest.raises(ValueError):
        launch_workers.parse_nb_workers(["a.py", "--nb_workers=two"])


# --- 2 workers end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A uniform run with 2 workers whose worker 1 is killed during float training, then the reruns.

    Returns (cwd, dumps directory, (worker 0's status, stderr, seconds from the kill to its exit),
    the single-process rerun, the 2-worker rerun, which dumps every worker's variables at its sync checks).
    """
    cwd = tmp_path_factory.mktemp("two_workers")
    dumps = cwd / "dumps"
    dumps.mkdir()
    addresses = ["localhost:%d" % port for port in launch_workers.free_ports(2)]
    workers = []
    for index in range(2):
        env = dict(_env(), TF_CONFIG=launch_workers.tf_config(addresses, index))
        workers.append(subprocess.Popen([sys.executable, SCRIPT, "--nb_workers=2"] + ARGS, cwd=str(cwd), env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for line in workers[0].stdout:
            if line.startswith("full-prec iter 6/12"):
                break
        else:
            pytest.fail("worker 0 ended early: %s" % workers[0].stderr.read()[-2000:])
        workers[1].send_signal(signal.SIGKILL)
        killed = time.time()
        _, err = workers[0].communicate(timeout=120)
        killed_run = (workers[0].returncode, err, time.time() - killed)
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    single = subprocess.run([sys.executable, SCRIPT] + ARGS, cwd=str(cwd), env=_env(), capture_output=True,
                            text=True, timeout=300)
    rerun = _launch(cwd, ARGS, dumps)
    return cwd, dumps, killed_run, single, rerun


def test_killed_worker_stops_the_other_with_one_line(interrupted_run):
    status, err, seconds = interrupted_run[2]
    assert status == 2 and seconds < 60
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "worker 0: a collective step at step" in error_lines[0], err[-2000:]
    assert "Traceback" not in err


def test_resuming_with_another_number_of_workers_is_refused(interrupted_run):
    single = interrupted_run[3]
    assert single.returncode == 2
    assert "--nb_workers 2 (recorded) vs unset (now)" in single.stderr.strip().splitlines()[-1]


def test_rerun_resumes_and_workers_hold_identical_variables(interrupted_run):
    cwd, dumps, _, _, rerun = interrupted_run
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    lines = rerun.stdout.splitlines()
    resumed = re.search(r"\[worker 0\] full-prec: resuming from .*model\.ckpt-(\d+) at step (\d+) of 12", rerun.stdout)
    assert resumed and resumed.group(1) == resumed.group(2) and int(resumed.group(1)) >= 4
    # Float: after restoring and at step 12; quantized: at start and step 8; the chief says so.
    for step in (int(resumed.group(1)), 12, 0, 8):
        assert "[worker 0] workers in sync at step %d" % step in lines
    for when in ("at_step_12", "at_step_8"):
        first = np.load(str(dumps / ("worker0-%s.npz" % when)))
        second = np.load(str(dumps / ("worker1-%s.npz" % when)))
        assert sorted(first.files) == sorted(second.files) and len(first.files) > 5
        for name in first.files:
            np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # The final checkpoints hold the values the workers had (quantized: activation ranges included).
    for when, prefix in (("at_step_12", "models/model.ckpt-12"), ("at_step_8", "models_uql/model.ckpt-8")):
        saved = _checkpoint_values(str(cwd / prefix))
        dumped = np.load(str(dumps / ("worker1-%s.npz" % when)))
        assert set(saved) == set(dumped.files)
        for name in saved:
            np.testing.assert_array_equal(saved[name], dumped[name], err_msg=name)
    assert any(name.endswith("ema_max") for name in saved)


def test_chief_alone_writes_and_evaluates(interrupted_run):
    cwd, _, _, _, rerun = interrupted_run
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    lines = rerun.stdout.splitlines()
    worker1 = [line for line in lines if line.startswith("[worker 1] ")]
    assert not any("accuracy" in line or "iter " in line or "saved" in line for line in worker1)
    assert sum(1 for line in lines if line.startswith("[worker 0] quantized accuracy:")) == 1
    results = json.loads((cwd / "models_uql" / "results.json").read_text())
    assert results["test_examples"] == 32 and results["quant_checkpoint"].endswith("model.ckpt-8")
    # The chief saved the inference graph export reads (the ConvNet's 28x28x1 input, its logits).
    from tfquant.export import inference_graph
    saved = inference_graph.InferenceGraph(str(cwd / "models_uql" / inference_graph.INFERENCE_GRAPH_NAME))
    assert saved.input_shape == [None, 28, 28, 1]
    # One events file per run of the chief: the killed run and the rerun for float, the rerun for quantized.
    for phase, count in (("full-prec", 2), ("uniform", 1)):
        assert len(glob.glob(str(cwd / "logs" / phase / "train" / "events.out.tfevents.*"))) == count
    tags, _ = event_tags(str(cwd / "logs" / "uniform" / "train"))
    assert len(tags["loss"]) == 4  # every second of 8 quantized steps
    float_record = json.loads((cwd / "models" / "model.ckpt.settings.json").read_text())
    assert float_record["settings"]["nb_workers"] == 2 and float_record["settings"]["enbl_lrn_rate_scaling"]
    # Learning rate scaled by the 2 workers: fine-tuning's cosine from 2 x 0.01, logged at global step 1 of 8.
    np.testing.assert_allclose(tags["lrn_rate"][0], 2 * 0.01 * 0.5 * (1 + np.cos(np.pi * 1 / 8)), rtol=1e-5)


def test_two_workers_take_the_step_one_process_takes_on_the_global_batch(tmp_path):
    """Gradients are averaged, not summed: 2 workers x 4 images = 1 process x 8 images (ConvNet: no batch norm)."""
    one_step = ["--learner=full-prec", "--train_subset=8", "--eval_subset=16", "--batch_size_eval=16",
                "--nb_epochs_rat=0.3", "--collective_timeout_secs=20"]  # ceil(0.3 x 3 epochs x 8 / 8) = 1 step
    single = subprocess.run([sys.executable, SCRIPT, "--batch_size=8", "--save_path=one/model.ckpt"] + one_step,
                            cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    two = _launch(tmp_path, ["--batch_size=4", "--save_path=two/model.ckpt", "--noenbl_lrn_rate_scaling"] + one_step)
    assert two.returncode == 0, two.stderr[-3000:]
    start = _checkpoint_values(str(tmp_path / "one" / "model.ckpt-1"))
    together = _checkpoint_values(str(tmp_path / "two" / "model.ckpt-1"))
    assert set(start) == set(together)
    momentum = [name for name in start if name.endswith("/Momentum")]
    assert len(momentum) == 8
    for name in momentum:  # the slot after one step is the gradient itself; summed gradients would be 2x
        assert np.abs(start[name]).max() > 1e-3, name
        np.testing.assert_allclose(together[name], start[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_ring_model_sends_twice_the_buffer_less_one_share():
    from benchmarks import allreduce
    # A ring all-reduce moves 2 (N-1)/N of the buffer through every link: at N=2 the whole buffer once.
    assert allreduce.ring_seconds(8e6, 2, 1e6, 0.0) == pytest.approx(8.0)
    assert allreduce.ring_seconds(8e6, 4, 1e6, 0.0) == pytest.approx(8.0 * 2 * 3 / 4)
    assert allreduce.ring_seconds(8e6, 4, 1e6, 0.001) == pytest.approx(12.0 + 6 * 0.001)
    assert allreduce.ring_seconds(8e6, 1, 1e6, 0.001) == 0.0
