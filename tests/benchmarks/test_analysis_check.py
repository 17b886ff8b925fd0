"""benchmarks.analysis_check --quick: the analysis's top-3 overrides fine-tuned and judged, checked against the files
each run wrote (analysis.json, results.json, quant_report.json), and the section it renders."""
import itertools
import os

import numpy as np
import pytest

from benchmarks import accuracy_table, analysis_check, publish


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    directory = tmp_path_factory.mktemp("analysis_check")
    work_dir = str(directory / "work")
    markdown = publish.BENCHMARKS_MD
    before = open(markdown).read() if os.path.exists(markdown) else None
    payload = analysis_check.main(["--quick", "--work_dir", work_dir, "--output", str(directory / "out.json")])
    return dict(payload=payload, work_dir=work_dir, output=str(directory / "out.json"), markdown_before=before)


def _run_dir(work_dir, label):
    return accuracy_table.row_dir(work_dir, label, 0)


def test_the_top_three_overrides_are_the_analysis_files_and_each_run_applied_its_own(quick):
    seed = quick["payload"]["seeds"][0]
    base_dir = _run_dir(quick["work_dir"], "W2A2 ch")
    analysis = publish.load_json(os.path.join(base_dir, "analysis.json"))
    assert len(analysis["layers"]) > 3  # more targets than the check runs: it really chose among them
    assert seed["analysis"]["targets"] == len(analysis["layers"])
    assert seed["analysis"]["top"] == analysis["layers"][:3]
    # The overrides run are those the analysis printed, in its order.
    for line, run in zip(seed["analysis"]["printed"], seed["overrides"]):
        assert line.strip().startswith("%d. " % run["rank"]) and line.endswith("fix: " + run["override"])
    assert len(seed["analysis"]["printed"]) == 3
    base_results = publish.load_json(os.path.join(base_dir, "results.json"))
    assert seed["base"]["accuracy"] == base_results["quant_accuracy"]
    base_report = {layer["name"]: layer for layer in publish.load_json(os.path.join(base_dir, "quant_report.json"))
                   ["layers"]}
    for run, layer in zip(seed["overrides"], analysis["layers"]):
        run_dir = _run_dir(quick["work_dir"], run["label"])
        results = publish.load_json(os.path.join(run_dir, "results.json"))
        assert run["accuracy"] == results["quant_accuracy"]
        assert run["measured_recovery"] == pytest.approx(results["quant_accuracy"] - base_results["quant_accuracy"])
        assert (run["predicted_recovery"], run["predicted_drop"]) == (layer["recovery_if_float"], layer["drop_alone"])
        assert (run["predicted_loss_recovery"], run["predicted_override_recovery"]) == (
            layer["loss_recovery_at_override"], layer["recovery_at_override"])
        # The run's own report shows the override took: that layer at 8 bits, which the plain W2A2 run had at 2.
        report = {entry["name"]: entry for entry in publish.load_json(os.path.join(run_dir, "quant_report.json"))
                  ["layers"]}
        assert base_report[layer["name"]]["bits"] == 2 and report[layer["name"]]["bits"] == 8
        changed = [name for name in report if report[name]["bits"] != base_report[name]["bits"]]
        assert set(changed) <= {layer["name"]} | {n for n in report if report[n].get("weight_variable")
                                                  and report[n]["weight_variable"] == layer["weight_variable"]}


def test_the_verdict_and_correlations_follow_the_measurements(quick):
    seed = quick["payload"]["seeds"][0]
    measured = np.array([run["measured_recovery"] for run in seed["overrides"]])
    assert seed["worst_recovers_most"] == bool(measured[0] == measured.max())
    for key, field in (("spearman_loss_at_override", "predicted_loss_recovery"),
                       ("spearman_recovery", "predicted_recovery"), ("spearman_drop", "predicted_drop")):
        predicted = np.array([run[field] for run in seed["overrides"]])
        if np.ptp(predicted) == 0 or np.ptp(measured) == 0:
            assert seed[key] is None
        else:
            assert seed[key] == pytest.approx(np.corrcoef(_average_ranks(predicted), _average_ranks(measured))[0, 1])


def _average_ranks(values):
    """Brute force: each value's rank is 1 + the number below it + half the others equal to it."""
    return np.array([1 + np.sum(values < v) + (np.sum(values == v) - 1) / 2 for v in values])


def test_spearman_against_brute_force_ranks_with_ties():
    for xs, ys in itertools.product([(0.1, 0.3, 0.2, 0.2), (1, 2, 3, 4)], [(4, 3, 3, 1), (0.5, 0.1, 0.9, 0.2)]):
        expected = np.corrcoef(_average_ranks(np.array(xs)), _average_ranks(np.array(ys)))[0, 1]
        assert analysis_check.spearman(list(xs), list(ys)) == pytest.approx(expected)
    assert analysis_check.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert analysis_check.spearman([1, 1, 1], [3, 2, 1]) is None


def test_the_timing_and_section_are_recorded_and_quick_writes_no_benchmarks_md(quick, tmp_path):
    payload = quick["payload"]
    analysis = payload["seeds"][0]["analysis"]
    assert analysis["wall_seconds"] > analysis["analysis_seconds"] > 0 and analysis["cpu_seconds"] > 0
    assert len(analysis["load_before"]) == 3 and len(analysis["load_after"]) == 3
    assert "--exec_mode=analyze" in analysis["command"] and "--eval_subset=200" in analysis["command"]
    assert analysis["examples"] == 200
    assert publish.load_json(quick["output"])["seeds"] == payload["seeds"]
    now = open(publish.BENCHMARKS_MD).read() if os.path.exists(publish.BENCHMARKS_MD) else None
    assert now == quick["markdown_before"]
    markdown = str(tmp_path / "B.md")
    publish.write_section(analysis_check.SECTION, analysis_check.render(payload), markdown)
    text = open(markdown).read()
    for run in payload["seeds"][0]["overrides"]:
        assert "`%s`" % run["override"] in text and "%.2f" % (100 * run["accuracy"]) in text
    verdict = "met" if payload["seeds"][0]["worst_recovers_most"] else "**not met**"
    assert "recovers the most: %s (" % verdict in text
    assert "within 180 s: %s (%.1f s" % ("met" if analysis["wall_seconds"] <= 180 else "**not met**",
                                         analysis["wall_seconds"]) in text


def test_bad_arguments_are_refused():
    with pytest.raises(publish.BenchmarkError, match="--epochs"):
        analysis_check.main(["--quick", "--epochs=0"])
    with pytest.raises(publish.BenchmarkError, match="expected a flag and its value"):
        analysis_check.override_flags("model/conv1=8")
    assert analysis_check.override_flags("--uql_weight_overrides 'model/conv1/kernel=8'") == [
        "--uql_weight_overrides=model/conv1/kernel=8"]
