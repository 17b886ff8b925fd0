"""The chaos benchmark's quick mode: a run killed with SIGKILL and resumed ends as the uninterrupted run."""
import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from tests.learners.test_end_to_end import ROOT
from tfquant import checkpoints


def _latest_values(directory):
    path, step, _ = checkpoints.latest_valid_checkpoint(os.path.join(directory, "models", "model.ckpt"))
    reader = tf.train.load_checkpoint(path)
    return step, {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def test_chaos_quick_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-m", "benchmarks.chaos", "--quick", "--workdir", str(tmp_path / "work"),
                             "--output", str(tmp_path / "chaos.json"), "--markdown", str(tmp_path / "B.md")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert not (tmp_path / "B.md").exists()  # a quick run never publishes
    record = json.loads((tmp_path / "chaos.json").read_text())
    assert record["kill_points"] == 2 and [k["phase"] for k in record["kills"]] == ["train", "eval"]
    assert record["differences"] == [] and record["lost_beyond_save_interval"] == 0
    assert all(0 <= k["lost_steps"] <= record["save_step"] for k in record["kills"])
    # Checked here too, independently of the script: the final checkpoints and the printed accuracies.
    want_step, want = _latest_values(str(tmp_path / "work" / "reference"))
    got_step, got = _latest_values(str(tmp_path / "work" / "chaos"))
    assert want_step == got_step == 6 and sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    accuracy = [line for line in result.stdout.splitlines() if line.startswith("eval: full-prec eval: accuracy ")]
    assert len(accuracy) == 1 and record["accuracy_lines"]["eval"] == [accuracy[0][len("eval: "):]]
    assert "differences from the uninterrupted run: 0" in result.stdout
