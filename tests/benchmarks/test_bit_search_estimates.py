"""The comparison of cheaper sensitivity estimates with today's: its margin against enumerating every allocation,
and the --quick run's contents (bits per budget re-solved from its sensitivities, MACs counted, refusals)."""
import itertools

import pytest

from benchmarks import bit_search_estimates, publish
from tfquant import allocation, sensitivity


def _brute_force_gap(items, equivalent):
    """(best objective, smallest objective increase of any other allocation within budget) by enumeration."""
    budget = allocation.budget_bits(sum(i.size for i in items), equivalent)
    feasible = sorted(
        (sum(i.sensitivities[b] for i, b in zip(items, choice)), choice)
        for choice in itertools.product(*[sorted(i.sensitivities) for i in items])
        if sum(b * i.size for i, b in zip(items, choice)) <= budget)
    best = allocation.solve(items, equivalent)
    chosen = tuple(best.bits[i.name] for i in items)
    return best.objective, min(value for value, choice in feasible if choice != chosen) - best.objective


@pytest.mark.parametrize("equivalent", [2.0, 2.5, 3.4])
def test_margin_is_the_gap_to_the_next_best_allocation_by_enumeration(rng, equivalent):
    items = [allocation.AllocationItem("layer%d" % i, int(size), {b: float(v) for b, v in zip(
        range(1, 6), sorted(rng.uniform(0, 1, 5), reverse=True))})
        for i, size in enumerate(rng.integers(1, 40, 5))]
    objective, gap = _brute_force_gap(items, equivalent)
    found, name, bits = bit_search_estimates.margin(items, equivalent)
    assert found == pytest.approx(gap, abs=1e-12)
    # The allocation the margin names really holds that layer at those bits, and costs the margin more.
    held = [allocation.AllocationItem(i.name, i.size, {bits: i.sensitivities[bits]}) if i.name == name else i
            for i in items]
    assert allocation.solve(held, equivalent).objective - objective == pytest.approx(found, abs=1e-12)
    assert allocation.solve(items, equivalent).bits[name] != bits


def test_margin_is_zero_on_a_tie():
    # Two equal layers, one extra bit to give: either may take it, at the same objective.
    items = [allocation.AllocationItem(name, 10, {1: 1.0, 2: 0.5}) for name in ("a", "b")]
    assert bit_search_estimates.margin(items, 1.5)[0] == 0.0


def test_quick_comparison_reports_bits_and_macs_per_budget(tmp_path):
    payload = bit_search_estimates.main(["--quick", "--seeds", "0", "--examples", "8,16", "--measured_widths", "2:1",
                                         "--output", str(tmp_path / "c.json")])
    entry, = payload["seeds"]
    assert entry["batch_examples"] == 32 and set(entry["budgets"]) == {"W2 A2.5", "W3 A2.5"}
    estimates = {e["estimate"]: e["budgets"] for e in entry["estimates"]}
    assert list(estimates) == ["2 weight, 1 activation widths measured, wider ones to first order",
                               "first 8 of 32 examples", "first 16 of 32 examples"]
    for label, today in entry["budgets"].items():
        assert set(today["bits"]) == {"weight", "activation"}
        # The W3 budget cannot give a weight fewer than its minimum, 2 bits; W2's may (1 bit).
        assert min(today["bits"]["weight"]) >= (2 if label.startswith("W3") else 1)
        assert today["margin"]["weight"]["objective_increase"] >= 0
        for name, rows in estimates.items():
            row = rows[label]
            assert row["measure_cpu_seconds"] > 0
            assert row["layers_differing"] == {kind: sum(a != b for a, b in zip(row["bits"][kind], today["bits"][kind]))
                                               for kind in today["bits"]}
            if name.startswith("first"):
                # Counted on a graph of N examples: conv MACs are proportional to the examples.
                assert row["search_epoch_mac_ratio"] == pytest.approx(
                    today["search_epoch_mac_ratio"] * int(name.split()[1]) / 32, rel=1e-12)
        # Widths 1-4 (W2) or 2-4 (W3): 2 of 4 or 3 weight widths and 1 of 3 activation widths get loss runs, and the
        # float pass is a forward and backward pass (3 forward passes) giving the gradients.
        first_order = estimates["2 weight, 1 activation widths measured, wider ones to first order"][label]
        runs = 2 * sum(entry["run_macs"]["weight"]) + 1 * sum(entry["run_macs"]["activation"])
        forward = entry["forward_macs"]
        assert first_order["search_epoch_mac_ratio"] == pytest.approx(
            (runs + 3 * forward) / forward / entry["epoch_forward_passes"], rel=1e-12)
        every = (4 if label.startswith("W2") else 3) * sum(entry["run_macs"]["weight"]) + 3 * sum(
            entry["run_macs"]["activation"])
        assert today["search_epoch_mac_ratio"] == pytest.approx(
            (forward + every) / forward / entry["epoch_forward_passes"], rel=1e-12)
    # Each budget's bits solved again from the stored sensitivities: weights from the budget's minimum width.
    for label, (weight_min, weight_bits) in {"W2 A2.5": (1, 2), "W3 A2.5": (2, 3)}.items():
        for kind, low, equivalent in (("weight", weight_min, weight_bits), ("activation", 2, 2.5)):
            stored = entry["sensitivities"][kind]
            items = [allocation.AllocationItem(name, size, sensitivity.non_increasing(
                {int(b): v for b, v in by_bits.items() if int(b) >= low}))
                for (name, by_bits), size in zip(stored.items(), entry["sizes"][kind])]
            solved = allocation.solve(items, equivalent).bits
            assert entry["budgets"][label]["bits"][kind] == [solved[name] for name in stored]
    kept = [e["estimate"] for e in entry["estimates"] if not any(
        n for b in e["budgets"].values() for n in b["layers_differing"].values())]
    assert payload["kept"] == kept
    assert publish.load_json(str(tmp_path / "c.json"))["seeds"][0]["budgets"] == entry["budgets"]


def test_comparison_refuses_bad_example_counts():
    with pytest.raises(publish.BenchmarkError, match="--examples=0,8 is not valid"):
        bit_search_estimates.main(["--quick", "--seeds", "0", "--examples", "0,8"])
    with pytest.raises(publish.BenchmarkError, match="--measured_widths=4 is not valid; expected comma-separated W:A"):
        bit_search_estimates.main(["--quick", "--seeds", "0", "--measured_widths", "4"])
    with pytest.raises(publish.BenchmarkError, match="--examples=x is not valid"):
        bit_search_estimates.main(["--quick", "--seeds", "0", "--examples", "x"])
    with pytest.raises(publish.BenchmarkError, match="a batch holds 32 examples; expected fewer"):
        bit_search_estimates.main(["--quick", "--seeds", "0", "--examples", "32"])
    with pytest.raises(publish.BenchmarkError, match="--float_checkpoint is required without --quick"):
        bit_search_estimates.main(["--seeds", "0"])
