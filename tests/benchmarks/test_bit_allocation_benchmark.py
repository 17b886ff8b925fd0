"""benchmarks.bit_allocation --quick: auto, uniform and random rows from one float checkpoint, within budget."""
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import accuracy_table, bit_allocation, machine, publish

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def quick_work(tmp_path_factory):
    """One --quick work directory for the module's quick runs: the seed's float checkpoint is trained by the first
    run and fine-tuned by the others (each row still runs from scratch in its own row directory)."""
    return tmp_path_factory.mktemp("alloc_quick") / "work"


def test_bit_allocation_quick(tmp_path, quick_work):
    output, work, markdown = tmp_path / "alloc.json", quick_work, tmp_path / "BENCHMARKS.md"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bit_allocation", "--quick", "--output", str(output),
                           "--work_dir", str(work), "--markdown", str(markdown)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not markdown.exists()
    data = json.loads(output.read_text())
    assert [(e["budget"], e["method"]) for e in data["entries"]] == [
        ("W3 A2.5", "auto"), ("W3 A2.5", "uniform"), ("W3 A2.5", "random 0")]
    assert len({e["float_accuracy"] for e in data["entries"]}) == 1  # one float checkpoint
    auto_dir = accuracy_table.row_dir(str(work), "W3 A2.5 auto", 0)
    stored = json.loads(open(os.path.join(auto_dir, "bit_allocation.json")).read())
    assert data["entries"][0]["search_seconds"] == stored["search_seconds"] > 0
    assert data["entries"][0]["epoch_seconds"] > 0
    # The random row really ran with its bits, and they fit the same weight and activation budgets.
    random_dir = accuracy_table.row_dir(str(work), "W3 A2.5 random 0", 0)
    report = json.loads(open(os.path.join(random_dir, "quant_report.json")).read())
    bits = {layer["name"]: layer["bits"] for layer in report["layers"]}
    for kind, equivalent in (("weight", 3), ("activation", 2.5)):
        layers = stored[kind]["layers"]
        used = sum(bits[layer["ops"][0]] * layer["size"] for layer in layers)
        assert used <= math.floor(equivalent * sum(layer["size"] for layer in layers))
        assert all(2 <= bits[layer["ops"][0]] <= 8 for layer in layers)
    results = json.loads(open(os.path.join(random_dir, "results.json")).read())
    assert results["quant_accuracy"] == data["entries"][2]["accuracy"]
    text = bit_allocation.render(data, "cmd")
    assert "| W3 A2.5 | 0 |" in text and "search at most 10 %" in text


def _entry(budget, method, seed, accuracy):
    return {"budget": budget, "method": method, "seed": seed, "accuracy": accuracy, "float_accuracy": 0.9,
            "search_seconds": 1.0, "epoch_seconds": 100.0}


def test_parts_merge_by_budget_method_and_seed_and_another_plan_is_refused():
    plan = dict(bit_allocation.FULL, randoms=1, budgets=["W3 A4"])
    first, budgets = bit_allocation.merge(None, [_entry("W3 A4", "random 0", 0, 0.88), _entry("W3 A4", "auto", 0, 0.9),
                                                 _entry("W3 A4", "uniform", 0, 0.89)], plan, "r.json")
    assert budgets == ["W3 A4"]
    payload = {"quick": False, "plan": plan, "entries": first}
    part = dict(plan, budgets=["W2 A4"])
    merged, budgets = bit_allocation.merge(payload, [_entry("W2 A4", "auto", 1, 0.8), _entry("W3 A4", "auto", 0, 0.91)],
                                           part, "r.json")
    # BUDGETS order (W2 A4 first), then seed, then auto, uniform, randoms; a rerun replaces its entry.
    assert [(e["budget"], e["method"], e["seed"], e["accuracy"]) for e in merged] == [
        ("W2 A4", "auto", 1, 0.8), ("W3 A4", "auto", 0, 0.91), ("W3 A4", "uniform", 0, 0.89),
        ("W3 A4", "random 0", 0, 0.88)]
    assert budgets == ["W2 A4", "W3 A4"]
    for other in (dict(plan, epochs=2.0), dict(plan, finetune=["--uql_lrn_rate_init=0.1"])):
        with pytest.raises(publish.BenchmarkError, match="another plan"):
            bit_allocation.merge(payload, [], other, "r.json")


def test_more_randoms_merge_but_rows_of_another_float_checkpoint_are_refused():
    """A part with more random allocations joins a budget and seed run from the same float checkpoint; a row of
    that budget and seed from another float checkpoint (retrained elsewhere) is refused, naming both floats."""
    plan = dict(bit_allocation.FULL, randoms=1, budgets=["W3 A4"])
    first, _ = bit_allocation.merge(None, [_entry("W3 A4", m, 0, a) for m, a in (("auto", 0.9), ("uniform", 0.89),
                                                                                  ("random 0", 0.88))], plan, "r.json")
    payload = {"quick": False, "plan": plan, "entries": first}
    more = [_entry("W3 A4", "random %d" % i, 0, 0.85 + 0.01 * i) for i in range(1, 5)]
    merged, _ = bit_allocation.merge(payload, more, dict(plan, randoms=5), "r.json")
    table = bit_allocation.summarize(merged)
    assert table["W3 A4"]["randoms"] == [5] and table["W3 A4"]["best_random"][0] == pytest.approx(0.89)
    other_float = dict(_entry("W3 A4", "random 1", 0, 0.87), float_accuracy=0.91)
    with pytest.raises(publish.BenchmarkError, match=r"W3 A4, seed 0 .*\[0\.9, 0\.91\]"):
        bit_allocation.merge(payload, [other_float], plan, "r.json")
    # Another seed, or the same seed in another budget, may have its own float checkpoint; the table says so.
    merged, _ = bit_allocation.merge(payload, [dict(_entry("W2 A4", m, 0, 0.8), float_accuracy=0.91)
                                               for m in ("auto", "uniform", "random 0")], plan, "r.json")
    text = bit_allocation.render(dict(payload, entries=merged, load_before=None, machine={
        "cores": 2, "cpu": "x", "tensorflow": "2", "python": "3", "date": "d", "load_average": None}), "cmd")
    assert "Seed 0's float checkpoint is not the same in every budget (W2 A4: 91.00 %; W3 A4: 90.00 %" in text


def test_timing_entries_replace_the_rows_times_in_the_table():
    """--timing's alone-measured search and epoch seconds are what the search / epoch column shows; budgets
    without one keep the rows' means, and a rerun of a budget replaces its entry."""
    plan = dict(bit_allocation.FULL, randoms=1, budgets=["W3 A4", "W3 A2.5"])
    entries = [_entry(budget, method, 0, accuracy) for budget in ("W3 A4", "W3 A2.5")
               for method, accuracy in (("auto", 0.9), ("uniform", 0.89), ("random 0", 0.88))]
    timing = {"budget": "W3 A2.5", "seed": 0, "search_seconds": 6.0, "epoch_seconds": 150.0,
              "load_before": [0.1, 0.2, 0.3], "load_after": [0.4, 0.5, 0.6], "date": "2026-11-23"}
    merged = bit_allocation.merge_timing({"timing": [dict(timing, search_seconds=9.0)]}, [timing])
    assert merged == [timing]
    payload = {"quick": False, "plan": plan, "entries": entries, "timing": merged, "load_before": [0.1, 0.1, 0.1],
               "machine": {"cores": 2, "cpu": "x", "tensorflow": "2", "python": "3", "date": "d",
                           "load_average": [0.1, 0.1, 0.1]}}
    table = bit_allocation.summarize(entries, merged)
    assert (table["W3 A2.5"]["search_seconds"], table["W3 A2.5"]["epoch_seconds"]) == (6.0, 150.0)
    assert (table["W3 A4"]["search_seconds"], table["W3 A4"]["epoch_seconds"]) == (1.0, 100.0)
    text = bit_allocation.render(payload, "cmd")
    assert "| W3 A2.5 | 0 | 1 | 90.00 | 89.00 | 88.00 | 6.0 | 150.0 | 4.0 % |" in text
    assert "| W3 A4 | 0 | 1 | 90.00 | 89.00 | 88.00 | 1.0 | 100.0 | 1.0 % |" in text
    assert "Search and epoch times of W3 A2.5: measured alone" in text and "[0.1, 0.2, 0.3] / [0.4, 0.5, 0.6]" in text
    assert "Other budgets: means over the accuracy rows" in text


def test_timing_repeats_record_every_run_and_their_medians(tmp_path, monkeypatch):
    """--timing_repeats: each repeat measures from scratch (its leftover directory removed), the entry holds every
    run's search and epoch seconds and the column shows their medians."""
    searches, epochs = iter([9.0, 7.0, 8.5]), iter([95.0, 90.0, 99.0])
    seen = []

    def fake_run_row(work_dir, budget, method, seed, plan, extra=None):
        out_dir = accuracy_table.row_dir(work_dir, "%s %s" % (budget.label, method), seed)
        seen.append(os.path.exists(os.path.join(out_dir, "leftover")))
        os.makedirs(out_dir, exist_ok=True)
        open(os.path.join(out_dir, "leftover"), "w").close()
        return {"search_seconds": next(searches), "epoch_seconds": next(epochs)}, out_dir

    monkeypatch.setattr(bit_allocation, "run_row", fake_run_row)
    monkeypatch.setattr(machine, "SETTLE_SECONDS", 0)  # a full run's wait for the load to fade: nothing ran here
    budget = next(b for b in bit_allocation.BUDGETS if b.label == "W2 A2.5")
    entry = bit_allocation.run_timing(str(tmp_path), budget, 0, bit_allocation.FULL, repeats=3)
    assert seen == [False, False, False]
    assert (entry["search_runs"], entry["epoch_runs"]) == ([9.0, 7.0, 8.5], [95.0, 90.0, 99.0])
    assert (entry["search_seconds"], entry["epoch_seconds"]) == (8.5, 95.0)
    plan = dict(bit_allocation.FULL, randoms=1, budgets=["W2 A2.5"])
    entries = [_entry("W2 A2.5", method, 0, accuracy) for method, accuracy in
               (("auto", 0.9), ("uniform", 0.89), ("random 0", 0.88))]
    payload = {"quick": False, "plan": plan, "entries": entries, "timing": [entry], "load_before": [0.1, 0.1, 0.1],
               "machine": {"cores": 2, "cpu": "x", "tensorflow": "2", "python": "3", "date": "d",
                           "load_average": [0.1, 0.1, 0.1]}}
    text = bit_allocation.render(payload, "cmd")
    assert "| W2 A2.5 | 0 | 1 | 90.00 | 89.00 | 88.00 | 8.5 | 95.0 | 8.9 % |" in text
    assert "3 runs: search 9.0, 7.0, 8.5 s, epoch 95.0, 90.0, 99.0 s" in text


def test_timing_repeats_must_be_positive(tmp_path):
    with pytest.raises(publish.BenchmarkError, match="--timing_repeats=0 is not valid; expected at least 1"):
        bit_allocation.main(["--timing", "--timing_repeats", "0", "--output", str(tmp_path / "r.json")])


def test_timing_quick_records_the_load_at_once(tmp_path, monkeypatch):
    """A quick timing run reads the end load once, as a quick accuracy run does; a full one waits for it to fade."""
    calls = []

    def fake_run_row(work_dir, budget, method, seed, plan, extra=None):
        return {"search_seconds": 1.0, "epoch_seconds": 10.0}, None

    monkeypatch.setattr(bit_allocation, "run_row", fake_run_row)
    monkeypatch.setattr(machine, "end_load", lambda quick=False: calls.append(quick) or [0.1, 0.1, 0.1])
    payload = bit_allocation.main(["--quick", "--timing", "--work_dir", str(tmp_path)])
    assert [t["load_after"] for t in payload["timing"]] == [[0.1, 0.1, 0.1]] and calls == [True]
    budget = next(b for b in bit_allocation.BUDGETS if b.label == "W3 A2.5")
    bit_allocation.run_timing(str(tmp_path), budget, 0, bit_allocation.FULL)
    assert calls == [True, False]


def test_timing_quick_measures_a_fresh_search(quick_work):
    """--quick --timing runs the auto row from scratch: its search time is the one its allocation file holds."""
    work = quick_work
    stale = accuracy_table.row_dir(str(work), "W3 A2.5 auto timing", 0)
    os.makedirs(stale)
    open(os.path.join(stale, "leftover"), "w").close()
    done = subprocess.run([sys.executable, "-m", "benchmarks.bit_allocation", "--quick", "--timing",
                           "--work_dir", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = json.loads(open(os.path.join(stale, "bit_allocation.json")).read())
    assert not os.path.exists(os.path.join(stale, "leftover"))
    line = [l for l in done.stdout.splitlines() if l.startswith("timing W3 A2.5")]
    assert line == ["timing W3 A2.5  search %.1f s, epoch %s" % (stored["search_seconds"], line[0].split("epoch ")[1])]
    assert float(line[0].split("epoch ")[1].split()[0]) > 0


def test_lsq_rows_may_come_from_another_float_checkpoint_than_the_min_max_rows(tmp_path):
    """The LSQ rows are compared only with each other, so they merge beside min/max rows of the same budget and seed
    fine-tuned from another float checkpoint (the table says so); within one family the check still refuses, and a
    missing float checkpoint is refused only for the family being run."""
    plan = dict(bit_allocation.FULL, randoms=1, budgets=["W3 A4"])
    minmax = [_entry("W3 A4", m, 0, a) for m, a in (("auto", 0.9), ("uniform", 0.89), ("random 0", 0.88))]
    payload = {"plan": plan, "entries": bit_allocation.merge(None, minmax, plan, "r.json")[0]}
    lsq = [dict(_entry("W3 A4", m, 0, a), float_accuracy=0.93, bits={"weight": {"c": 3}})
           for m, a in (("lsq auto", 0.91), ("lsq auto min/max", 0.9), ("lsq uniform", 0.905))]
    lsq[1]["differing_layers"] = []
    merged, _ = bit_allocation.merge(payload, lsq, plan, "r.json")
    assert len(merged) == 6
    with pytest.raises(publish.BenchmarkError, match=r"LSQ rows of W3 A4, seed 0 .*\[0\.93, 0\.94\]"):
        bit_allocation.merge(dict(payload, entries=merged), [dict(lsq[0], float_accuracy=0.94)], plan, "r.json")
    text = bit_allocation.render(dict(payload, entries=merged, load_before=None, machine={
        "cores": 2, "cpu": "x", "tensorflow": "2", "python": "3", "date": "d", "load_average": None}), "cmd")
    assert "not the same in every budget" not in text
    assert "Seed 0: the LSQ rows fine-tune a float checkpoint trained again (93.00 %) rather than the min/max " \
           "rows' (90.00 %)" in text
    same = bit_allocation.merge(payload, [dict(e, float_accuracy=0.9) for e in lsq], plan, "r.json")[0]
    text = bit_allocation.render(dict(payload, entries=same, load_before=None, machine={
        "cores": 2, "cpu": "x", "tensorflow": "2", "python": "3", "date": "d", "load_average": None}), "cmd")
    assert "Seed 0: the LSQ rows fine-tune a float checkpoint of the min/max rows' accuracy (90.00 %" in text
    # No float checkpoint in tmp_path: refused for the min/max family whose rows are stored, not for LSQ rows.
    with pytest.raises(publish.BenchmarkError, match="no float checkpoint of seed 0"):
        bit_allocation.check_float_checkpoints(payload, str(tmp_path), [0], ["W3 A4"], "r.json")
    bit_allocation.check_float_checkpoints(payload, str(tmp_path), [0], ["W3 A4"], "r.json", lsq=True)


def test_w2_a2_5_search_is_held_to_five_percent_of_an_epoch():
    """Issue 36 limits the W2 A2.5 search to 5 % of an epoch (other budgets keep 10 %); the line shows the share."""
    plan = dict(bit_allocation.FULL, randoms=1, budgets=["W2 A2.5", "W3 A4"])
    machine = {"cores": 2, "cpu": "x", "tensorflow": "2", "python": "3", "date": "d", "load_average": [0.1] * 3}
    for search, verdict in ((6.0, "**not met** (6.0 %)"), (4.0, "met (4.0 %)")):
        entries = [dict(_entry(budget, method, 0, accuracy), search_seconds=search)
                   for budget in ("W2 A2.5", "W3 A4")
                   for method, accuracy in (("auto", 0.9), ("uniform", 0.89), ("random 0", 0.88))]
        text = bit_allocation.render({"quick": False, "plan": plan, "entries": entries, "timing": [],
                                      "load_before": [0.1] * 3, "machine": machine}, "cmd")
        assert "- Target W2 A2.5: search at most 5 %% of an epoch: %s." % verdict in text
        assert "- Target W3 A4: search at most 10 %% of an epoch: met (%.1f %%)." % search in text
