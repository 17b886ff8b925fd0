"""benchmarks.multi_worker_accuracy --quick: both jobs really ran and the comparison is computed from them."""
import json
import os

from benchmarks import multi_worker_accuracy
from tests.benchmarks.test_benchmarks import run_quick


def test_quick_run_compares_one_and_two_workers_from_their_results_files(tmp_path):
    work_dir = tmp_path / "work"
    result = run_quick("multi_worker_accuracy", tmp_path, "--models", "convnet", "--work_dir", str(work_dir))
    entry = result["models"]["convnet"]
    assert set(result["models"]) == {"convnet"}
    for nb_workers in ("1", "2"):
        run = entry[nb_workers]
        # The figures are those of the run's own results.json (written by the chief for 2 workers).
        with open(os.path.join(work_dir, "seed0", "convnet_%sworker" % nb_workers, "quant", "results.json")) as f:
            written = json.load(f)
        assert run["float_accuracy"] == written["float_accuracy"]
        assert run["quant_accuracy"] == written["quant_accuracy"]
        assert run["test_examples"] == written["test_examples"] == 200
        assert run["workers_in_sync"] is True
    # Each worker trained with half the global batch: the settings record says so.
    with open(os.path.join(work_dir, "seed0", "convnet_2worker", "float", "model.ckpt.settings.json")) as f:
        settings = json.load(f)["settings"]
    assert settings["batch_size"] == multi_worker_accuracy.QUICK["global_batch"] // 2
    assert settings["nb_workers"] == 2 and settings["enbl_lrn_rate_scaling"] is False
    for key in ("float_accuracy", "quant_accuracy"):
        points = 100 * (entry["2"][key] - entry["1"][key])
        assert abs(entry["difference"][key]["points"] - points) < 1e-9
        assert entry["difference"][key]["met"] == (abs(points) <= multi_worker_accuracy.TARGET_POINTS)
