"""benchmarks.transformer_accuracy: --quick trains the float Transformer at two schedule lengths (benchmarks.baselines'
cache), fine-tunes W8A8 and W4A8 from the chosen one beside a float control, and its results file holds the runs' own
numbers with the gaps and targets computed from them."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import accuracy_table, accuracy_targets, baselines, publish, transformer_accuracy
from nets.data import fmnist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTROL = "float fine-tuned 0.25 epochs"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not os.path.isdir(fmnist.DEFAULT_DATA_DIR):
        pytest.skip("no Fashion-MNIST copy")
    tmp = tmp_path_factory.mktemp("ta")
    output, work = str(tmp / "ta.json"), str(tmp / "work")
    done = subprocess.run([sys.executable, "-m", "benchmarks.transformer_accuracy", "--quick", "--output", output,
                           "--work_dir", work], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    with open(output) as handle:
        return json.load(handle), work


def _load(path):
    with open(path) as handle:
        return json.load(handle)


def test_rows_fine_tune_the_cached_float_transformer_and_quantize_its_matmuls(quick):
    payload, work = quick
    cache = os.path.join(work, "baselines")
    manifest = _load(os.path.join(cache, baselines.MANIFEST))
    assert manifest["module"] == transformer_accuracy.RUN_MODULE
    assert [p["ratio"] for p in manifest["curve"]] == transformer_accuracy.QUICK["ratios"]
    assert [p["epochs"] for p in manifest["curve"]] == [20 * r for r in transformer_accuracy.QUICK["ratios"]]
    chosen, converged = baselines.choose_length({p["ratio"]: p["accuracies"] for p in manifest["curve"]})
    assert (payload["baselines"]["chosen_ratio"], payload["baselines"]["converged"]) == (chosen, converged)
    float_record = _load(os.path.join(baselines.length_dir(cache, chosen, 0), baselines.COMMAND))
    assert float_record["command"].startswith("python -m nets.transformer_at_fmnist_run --learner=full-prec")
    assert [(e["label"], e["seed"]) for e in payload["entries"]] == [("W8A8 ch", 0), ("W4A8 ch", 0)]
    assert [(c["label"], c["seed"]) for c in payload["controls"]] == [(CONTROL, 0)]
    for entry in payload["entries"] + payload["controls"]:
        results = _load(os.path.join(accuracy_table.row_dir(work, entry["label"], 0), "results.json"))
        assert results["model"] == "transformer_patches" and results["test_examples"] == 200
        assert entry["accuracy"] == results["quant_accuracy"]
        # Every run started from the cached float checkpoint: its accuracy is the one the float eval measured.
        assert results["float_checkpoint"].startswith(float_record["checkpoint_prefix"])
        assert entry["float_accuracy"] == pytest.approx(float_record["accuracy"], abs=1e-6)
    for entry, bits in zip(payload["entries"], (8, 4)):
        assert entry["control_accuracy"] == payload["controls"][0]["accuracy"]
        report = _load(os.path.join(accuracy_table.row_dir(work, entry["label"], 0), "quant_report.json"))
        weights = [l for l in report["layers"] if l["kind"] == "weight" and l["status"] == "quantized"]
        assert len(weights) == 12 and {l["op_type"] for l in weights} == {"MatMul", "BatchMatMulV2"}
        assert {l["bits"] for l in weights} == {bits} and all(l["num_groups"] == l["shape"][-1] for l in weights)
        activations = [l for l in report["layers"] if l["kind"] == "activation"]
        assert len(activations) == 20 and {(l["status"], l["bits"]) for l in activations} == {("quantized", 8)}


def test_gaps_and_targets_are_computed_from_the_rows_accuracies(quick):
    payload, _ = quick
    summary = payload["summary"]
    entries = {e["label"]: e for e in payload["entries"]}
    assert summary["float"]["accuracies"] == [entries["W8A8 ch"]["float_accuracy"]]
    for label, row in summary["rows"].items():
        entry = entries[label]
        assert row["mean"] == entry["accuracy"]
        assert row["change"] == pytest.approx(entry["accuracy"] - entry["float_accuracy"])
        assert row["vs_control"] == pytest.approx(entry["accuracy"] - entry["control_accuracy"])
    control = payload["controls"][0]
    assert summary["controls"][CONTROL]["change"] == pytest.approx(control["accuracy"] - control["float_accuracy"])
    targets = {t["what"]: t["met"] for t in summary["targets"]}
    assert targets["float at least 88 %"] == (entries["W8A8 ch"]["float_accuracy"] >= 0.88)
    for label, limit in (("W8A8 ch", 0.3), ("W4A8 ch", 1.0)):
        gap = 100 * (entries[label]["accuracy"] - entries[label]["float_accuracy"])
        assert targets["%s within %.1f point%s of the float model" % (label, limit, "" if limit == 1 else "s")] == (
            round(gap, 2) >= -limit)
    text = transformer_accuracy.render(payload, "cmd")
    row = summary["rows"]["W4A8 ch"]
    assert "| W4A8 ch | 0 | %.2f | %+.2f | %+.2f |" % (100 * row["mean"], 100 * row["change"],
                                                       100 * row["vs_control"]) in text
    assert "the target asks 3" in text


def test_render_json_rewrites_the_section_from_a_results_file(quick, tmp_path):
    payload, _ = quick
    saved, markdown = tmp_path / "full.json", tmp_path / "BENCHMARKS.md"
    publish.write_json(str(saved), dict(payload, quick=False))
    markdown.write_text("# b\n\n<!-- BEGIN transformer_accuracy -->\nNot measured yet.\n"
                        "<!-- END transformer_accuracy -->\n")
    transformer_accuracy.main(["--render_json", str(saved), "--markdown", str(markdown), "--allow_busy"])
    text = markdown.read_text()
    assert "Not measured yet" not in text
    assert transformer_accuracy.render(payload, payload["command"]) in text
    assert "Rows start from the 0.5-epoch models (one length run, so convergence is not shown" in text


def test_transformer_targets_judge_the_mean_gap_over_seeds():
    def row(changes, controls):
        return {"seeds": [0, 1, 2], "change": float(np.mean(changes)), "vs_control": float(np.mean(controls))}
    table = {"W8A8 ch": row([-0.002, -0.004, -0.003], [-0.001, -0.006, -0.005]),
             "W4A8 ch": row([-0.012, -0.009, -0.010], [0.0, -0.002, -0.001])}
    checks = {what: (met, value) for what, met, value in
              accuracy_targets.transformer_checks([0.881, 0.879, 0.880], table)}
    assert checks["float at least 88 %"] == (True, "88.00 %, 3 seeds")
    assert checks["W8A8 ch within 0.3 points of the float model"][0] is True  # -0.30 exactly
    assert checks["W8A8 ch within 0.3 points of the same-budget float control"][0] is False  # -0.40
    assert checks["W4A8 ch within 1.0 point of the float model"] == (False, "-1.03, 3 seeds")
    assert checks["W4A8 ch within 1.0 point of the same-budget float control"][0] is True
    checks = accuracy_targets.transformer_checks([0.8799], {})
    assert checks == [("float at least 88 %", False, "87.99 %, 1 seed; the target asks 3")]


def test_bad_ratios_epochs_and_another_models_baselines_are_refused(tmp_path):
    for flags, message in ((["--ratios", "2,1"], "--ratios=2,1 is not valid"),
                           (["--ratios", "1,x"], "--ratios=1,x is not valid"),
                           (["--epochs", "6"], "--epochs=6 is not valid")):
        with pytest.raises(publish.BenchmarkError, match=message):
            transformer_accuracy.main(["--quick", "--work_dir", str(tmp_path)] + flags)
    # A cache of ResNet-20 float models (a manifest written before the module was recorded) is no Transformer's.
    publish.write_json(str(tmp_path / baselines.MANIFEST), {"float_flags": ["--nb_epochs_rat=1"], "baselines": {},
                                                            "float_common": transformer_accuracy.QUICK["common"]})
    with pytest.raises(publish.BenchmarkError, match="holds float models of nets.resnet_at_fmnist_run; expected "
                                                     "nets.transformer_at_fmnist_run"):
        transformer_accuracy.finetune_budget(transformer_accuracy.QUICK, 0.25, str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "benchmarks.transformer_accuracy", "--quick", "--ratios", "0",
                           "--work_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("error: --ratios=0 is not valid; expected increasing positive ratios")
