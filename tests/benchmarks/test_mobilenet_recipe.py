"""benchmarks.mobilenet_recipe: --quick runs the float model, W4A4 plain, W4A4 with the recipe and the float control
through the MobileNetV2 run script, and its results file holds those rows with the runs' own numbers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import mobilenet_recipe
from nets.data import fmnist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not os.path.isdir(fmnist.DEFAULT_DATA_DIR):
        pytest.skip("no Fashion-MNIST copy")
    if os.environ.get("TFQ_SLOW_TESTS") != "1":
        # Four MobileNetV2 runs whose first quantized steps alone take minutes of CPU: over 25 min on the 2-core
        # machine, more than the suite's budget allows. The pure tests below still run.
        pytest.skip("the recipe benchmark's --quick run takes over 25 min here; TFQ_SLOW_TESTS=1 runs it")
    tmp = tmp_path_factory.mktemp("mr")
    output, work = str(tmp / "mr.json"), str(tmp / "work")
    done = subprocess.run([sys.executable, "-m", "benchmarks.mobilenet_recipe", "--quick", "--output", output,
                           "--work_dir", work], cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    with open(output) as handle:
        return json.load(handle), work, done.stdout


def _run_results(work, label):
    with open(os.path.join(mobilenet_recipe.run_dir(work, label, 0), "results.json")) as handle:
        return json.load(handle)


def test_quick_results_hold_the_rows_with_the_runs_numbers(quick):
    payload, work, _ = quick
    assert payload["quick"] is True and payload["budget"] == mobilenet_recipe.QUICK
    control = "float fine-tuned 0.25 epochs"
    assert [(e["label"], e["seed"]) for e in payload["entries"]] == [
        (mobilenet_recipe.PLAIN, 0), (mobilenet_recipe.RECIPE, 0), (control, 0)]
    by_label = {e["label"]: e for e in payload["entries"]}
    for label, entry in by_label.items():
        # The figures are those each run wrote into its own results.json.
        results = _run_results(work, label)
        assert entry["accuracy"] == results["quant_accuracy"]
        assert entry["float_accuracy"] == results["float_accuracy"]
        assert entry["test_examples"] == 100
    # One float checkpoint per seed: every row starts from the same float accuracy.
    assert len({e["float_accuracy"] for e in payload["entries"]}) == 1
    for label in (mobilenet_recipe.PLAIN, mobilenet_recipe.RECIPE):
        assert by_label[label]["control_accuracy"] == by_label[control]["accuracy"]
    # The control quantized nothing; the W4A4 rows did, as their reports say.
    assert by_label[control]["depthwise"] == []
    plain, recipe = by_label[mobilenet_recipe.PLAIN], by_label[mobilenet_recipe.RECIPE]
    assert len(plain["depthwise"]) == len(recipe["depthwise"]) == 17
    assert all(groups == 1 for _, groups in plain["depthwise"])
    assert all(groups > 1 for _, groups in recipe["depthwise"])
    assert "oscillation" in recipe and "oscillation" not in plain
    # The float run's progress lines: 0.05 x 10 epochs x 128 images / 32 = 2 steps, logged every 2.
    assert [point[:2] for point in plain["curve"]] == [[2, 2]]


def test_summary_and_section_are_computed_from_the_entries(quick):
    payload, _, _ = quick
    table = mobilenet_recipe.summarize(payload)
    for label in (mobilenet_recipe.PLAIN, mobilenet_recipe.RECIPE):
        entry = [e for e in payload["entries"] if e["label"] == label][0]
        assert table[label]["mean"] == entry["accuracy"]
        assert table[label]["change"] == pytest.approx(entry["accuracy"] - entry["float_accuracy"])
    text = mobilenet_recipe.render(payload, "cmd")
    recipe = table[mobilenet_recipe.RECIPE]
    assert "| %s | 0 | %.2f |" % (mobilenet_recipe.RECIPE, 100 * recipe["mean"]) in text
    assert ("met" if recipe["change"] >= -0.015 else "**not met**") in text.split("Target:")[1]
    assert "17 depthwise layers have one range per channel" in text


def test_mean_std_and_target_over_seeds():
    def entry(label, seed, accuracy, float_accuracy):
        return {"label": label, "seed": seed, "accuracy": accuracy, "float_accuracy": float_accuracy,
                "control_accuracy": float_accuracy}
    payload = {"entries": [entry(mobilenet_recipe.RECIPE, s, a, f) for s, a, f in
                           ((0, 0.90, 0.92), (1, 0.91, 0.92), (2, 0.89, 0.91))]}
    table = mobilenet_recipe.summarize(payload)[mobilenet_recipe.RECIPE]
    assert table["mean"] == pytest.approx(np.mean([0.90, 0.91, 0.89]))
    assert table["std"] == pytest.approx(np.std([0.90, 0.91, 0.89], ddof=1))
    assert table["change"] == pytest.approx(np.mean([-0.02, -0.01, -0.02]))
    assert "**not met**" in mobilenet_recipe.target_lines({mobilenet_recipe.RECIPE: table})[0]
    table["change"] = -0.014
    assert ": met" in mobilenet_recipe.target_lines({mobilenet_recipe.RECIPE: table})[0]
