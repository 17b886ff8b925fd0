"""benchmarks.baselines (cached converged float models, the schedule-length curve) and the same-budget float control
of benchmarks.accuracy_table, with --baselines DIR."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import accuracy_table, baselines, float_control, publish

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_chosen_length_is_the_first_whose_doubling_adds_less_than_a_tenth_of_a_point():
    curve = {1.0: [0.910, 0.914], 2.0: [0.920, 0.924], 4.0: [0.9205, 0.9245], 8.0: [0.93, 0.93]}
    assert baselines.choose_length(curve) == (2.0, True)  # +0.05 point from 2 to 4 (8 is never reached)
    assert baselines.choose_length({1.0: [0.90], 2.0: [0.92]}) == (2.0, False)  # still rising: not converged
    assert baselines.choose_length({1.0: [0.92], 2.0: [0.91]}) == (1.0, True)


def test_a_control_keeps_the_training_flags_and_quantizes_nothing():
    row = accuracy_table.ROWS[[r.label for r in accuracy_table.ROWS].index("W2A2 ch LSQ + dst")]
    flags = float_control.control_flags(row.flags)
    assert flags == ["--enbl_dst", "--uql_weight_bits=32", "--uql_activation_bits=32"]
    assert float_control.control_label(row.flags, 1.0) == "float fine-tuned 1 epochs --enbl_dst"
    other = accuracy_table.ROWS[[r.label for r in accuracy_table.ROWS].index("W4A4 ch PACT + dst")]
    assert float_control.control_label(other.flags, 1.0) == float_control.control_label(row.flags, 1.0)
    assert float_control.control_label("--uql_weight_bits=4", 3.0) == "float fine-tuned 3 epochs"


def manifest(cache, common):
    payload = {"float_flags": ["--nb_epochs_rat=4"], "float_common": common, "chosen_ratio": 4.0,
               "baselines": {"0": {"checkpoint_prefix": "/cache/ratio4/seed0/float/model.ckpt"},
                             "1": {"checkpoint_prefix": "/cache/ratio4/seed1/float/model.ckpt"}}}
    publish.write_json(os.path.join(cache, baselines.MANIFEST), payload)


def test_rows_fine_tune_the_cached_baselines_and_each_control_runs_once(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    manifest(cache, accuracy_table.QUICK["common"])
    budget = accuracy_table.with_baselines(accuracy_table.QUICK, cache)
    flags = accuracy_table.run_flags("/w", accuracy_table.ROWS[0], 1, budget)
    assert "--save_path=/cache/ratio4/seed1/float/model.ckpt" in flags and "--nb_epochs_rat=4" in flags
    with pytest.raises(publish.BenchmarkError, match="no baseline of seed 2"):
        accuracy_table.run_flags("/w", accuracy_table.ROWS[0], 2, budget)
    with pytest.raises(publish.BenchmarkError, match="quick and full runs do not mix"):
        accuracy_table.with_baselines(accuracy_table.FULL, cache)
    with pytest.raises(publish.BenchmarkError, match="holds no baselines.json"):
        accuracy_table.with_baselines(accuracy_table.QUICK, str(tmp_path))
    calls = []

    def fake_run_row(work_dir, row, seed, budget_):
        calls.append((row.label, row.flags, seed, budget_["float"]))
        accuracy = 0.80 if row.label.startswith("float fine-tuned") else 0.78
        return {"label": row.label, "seed": seed, "accuracy": accuracy, "float_accuracy": 0.79, "ratio": 1.0,
                "flags": row.flags, "epochs": 0.25, "test_examples": 200, "seconds": 1.0}

    monkeypatch.setattr(accuracy_table, "run_row", fake_run_row)
    output = tmp_path / "acc.json"
    accuracy_table.main(["--quick", "--baselines", cache, "--rows", "W8A8,W4A4,W4A8 ch PTQ AdaRound", "--seeds",
                         "0,1", "--output", str(output), "--work_dir", str(tmp_path / "work")])
    controls = [c for c in calls if c[0].startswith("float fine-tuned")]
    # One control per seed: both rows share the epochs and have no distillation.
    assert [(c[0], c[1], c[2]) for c in controls] == [
        ("float fine-tuned 0.25 epochs", "--uql_weight_bits=32 --uql_activation_bits=32", s) for s in (0, 1)]
    assert all(c[3] == ["--nb_epochs_rat=4"] for c in calls)
    entries = json.loads(output.read_text())["entries"]
    ptq = [e for e in entries if e["label"] == "W4A8 ch PTQ AdaRound"]
    assert len(ptq) == 2 and all(e["control_accuracy"] is None for e in ptq)  # no fine-tuning, no control
    assert all(e["control_accuracy"] == 0.80 for e in entries if e not in ptq)
    table = accuracy_table.summarize(entries)
    assert table["W4A4"]["vs_control"] == pytest.approx(-0.02) and table["W4A4"]["change"] == pytest.approx(-0.01)
    payload = json.loads(output.read_text())
    text = accuracy_table.render(dict(payload, machine=dict(payload["machine"], cpu="c")), "cmd")
    assert "| W4A4 | 0,1 | 78.00 ± 0.00 | -1.00 | -2.00 | 1.00x |" in text
    assert "| W4A8 ch PTQ AdaRound | 0,1 | 78.00 ± 0.00 | -1.00 | - | 1.00x |" in text
    assert any("--learner=ptq" in c[1] and "--uql_adaround" in c[1] for c in calls)


def test_baselines_quick_caches_checkpoints_settings_and_commands(tmp_path):
    cache, store = tmp_path / "cache", tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "benchmarks.baselines", "--quick", "--cache_dir", str(cache),
                           "--seeds", "0", "--store", str(store)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((cache / baselines.MANIFEST).read_text())
    assert [point["ratio"] for point in data["curve"]] == baselines.QUICK["ratios"]
    for point in data["curve"]:
        record = json.loads((cache / ("ratio%g" % point["ratio"]) / "seed0" / baselines.COMMAND).read_text())
        assert point["accuracies"] == [record["accuracy"]] and 0.0 <= record["accuracy"] <= 1.0
        assert "--nb_epochs_rat=%g" % point["ratio"] in record["command"]
        settings = json.loads(open(record["settings_record"]).read())["settings"]
        assert settings["nb_epochs_rat"] == point["ratio"] and settings["seed"] == 0
        assert os.path.exists(record["checkpoint_prefix"] + "-1.index")
    chosen, converged = baselines.choose_length({p["ratio"]: p["accuracies"] for p in data["curve"]})
    assert (data["chosen_ratio"], data["converged"]) == (chosen, converged)
    assert data["baselines"]["0"]["ratio"] == chosen and data["float_flags"] == ["--nb_epochs_rat=%g" % chosen]
    assert "full-prec: saved" in (cache / ("ratio%g" % chosen) / "seed0" / "train.log").read_text()
    # A cache of another budget is refused, not reused.
    with pytest.raises(publish.BenchmarkError, match="do not share a cache"):
        baselines.train_baseline(str(cache), baselines.QUICK["ratios"][0], 0, dict(baselines.QUICK, common=[]))
    check_store(cache, store, data, monkeypatch_free_cache=tmp_path / "fresh")


def check_store(cache, store, data, monkeypatch_free_cache):
    """The store keeps each run's model variables (no optimizer slots) with relative paths, and a new cache takes
    the stored runs instead of training them."""
    import numpy as np
    import tensorflow as tf

    for point in data["curve"]:
        record = json.loads((store / ("ratio%g" % point["ratio"]) / "seed0" / baselines.COMMAND).read_text())
        assert record["checkpoint_prefix"] == os.path.join("float", "model.ckpt") and record["accuracy"] == \
            point["accuracies"][0]
        original = tf.train.load_checkpoint(str(cache / ("ratio%g" % point["ratio"]) / "seed0" / "float" /
                                                "model.ckpt-1"))
        kept = tf.train.load_checkpoint(str(store / ("ratio%g" % point["ratio"]) / "seed0" / "float" /
                                            "model.ckpt-1"))
        names = set(original.get_variable_to_shape_map())
        slots = {name for name in names if name.endswith("/Momentum")}
        assert slots and set(kept.get_variable_to_shape_map()) == names - slots
        for name in names - slots:
            assert np.array_equal(kept.get_tensor(name), original.get_tensor(name)), name
    stored = baselines.load_manifest(str(store))
    prefix = stored["baselines"]["0"]["checkpoint_prefix"]
    assert prefix == str(store / ("ratio%g" % data["chosen_ratio"]) / "seed0" / "float" / "model.ckpt")
    assert stored["chosen_ratio"] == data["chosen_ratio"] and stored["curve"] == data["curve"]

    def no_training(argv):
        raise AssertionError("trained %s although the store holds the run" % argv)

    original_run = baselines._run
    baselines._run = no_training
    try:
        again = baselines.converge(str(monkeypatch_free_cache), [0], baselines.QUICK, True, store_dir=str(store))
    finally:
        baselines._run = original_run
    assert [p["accuracies"] for p in again["curve"]] == [p["accuracies"] for p in data["curve"]]
    assert os.path.exists(again["baselines"]["0"]["checkpoint_prefix"] + "-1.index")


def test_a_table_on_the_committed_store_names_it_relative_to_the_repository_and_grows_seed_by_seed(tmp_path):
    inside = os.path.join(publish.REPO_ROOT, "benchmarks", "results", "baselines", "ratio8", "seed0", "float",
                          "model.ckpt")
    assert publish.repo_relative(inside) == os.path.join("benchmarks", "results", "baselines", "ratio8", "seed0",
                                                         "float", "model.ckpt")
    assert publish.repo_relative(str(tmp_path)) == str(tmp_path)
    one_seed = dict(accuracy_table.QUICK, baselines="benchmarks/results/baselines", float=["--nb_epochs_rat=8"],
                    baseline_prefixes={"0": "a/ratio8/seed0/float/model.ckpt"})
    three_seeds = dict(one_seed, baseline_prefixes={str(s): "a/ratio8/seed%d/float/model.ckpt" % s for s in range(3)})
    entry = {"label": "W8A8", "seed": 0, "accuracy": 0.9, "float_accuracy": 0.91}
    existing = {"quick": True, "budget": one_seed, "entries": [entry]}
    merged = accuracy_table.merge(existing, [dict(entry, seed=1)], True, three_seeds, "p")
    assert [e["seed"] for e in merged] == [0, 1]
    with pytest.raises(publish.BenchmarkError, match="different budget"):
        accuracy_table.merge(existing, [], True, dict(three_seeds, float=["--nb_epochs_rat=16"]), "p")


def test_the_status_section_lists_stored_runs_and_applies_the_rule_to_lengths_every_seed_finished(tmp_path):
    store = str(tmp_path)
    accuracies = {(8.0, 0): 0.935, (8.0, 1): 0.933, (16.0, 0): 0.9355, (16.0, 1): 0.9335, (4.0, 0): 0.93}
    for (ratio, seed), accuracy in accuracies.items():
        publish.write_json(os.path.join(baselines.length_dir(store, ratio, seed), baselines.COMMAND),
                           {"ratio": ratio, "seed": seed, "accuracy": accuracy, "seconds": 600.0,
                            "stored": {"date": "2026-12-07 18:00", "cpu": "c"}})
    text = "\n".join(baselines.status_lines(store, baselines.FULL, [0, 1]))
    assert "| 8 | 24 | 0: 93.50, 1: 93.30 | 93.40 ± 0.14 | 10, 10 | 2026-12-07 c |" in text
    assert "| 4 | 12 | 0: 93.00 | 93.00 |" in text
    # 4 is not finished by seed 1, so the rule sees 8 -> 16 only: +0.05 point, met at 24 epochs.
    assert "met at 24 epochs" in text
    assert "Still to train: 3 epochs seed 0" in text and "12 epochs seed 1" in text and "24 epochs seed" not in text
    publish.write_json(os.path.join(baselines.length_dir(store, 16.0, 1), baselines.COMMAND),
                       {"ratio": 16.0, "seed": 1, "accuracy": 0.9400, "seconds": 1.0})
    assert "not met yet (still rising at 48 epochs)" in "\n".join(baselines.status_lines(store, baselines.FULL,
                                                                                         [0, 1]))
