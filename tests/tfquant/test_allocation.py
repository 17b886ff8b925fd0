"""The exact bit-allocation solver against brute-force enumeration on small random instances."""
import itertools
import math

import numpy as np
import pytest

from tfquant import allocation
from tfquant.allocation import AllocationError, AllocationItem


def _brute_force(items, budget):
    """(least objective, its bits) over every combination within budget, or (None, None)."""
    best, best_bits = None, None
    for combo in itertools.product(*[sorted(item.sensitivities) for item in items]):
        cost = sum(b * item.size for b, item in zip(combo, items))
        if cost > budget:
            continue
        value = sum(item.sensitivities[b] for b, item in zip(combo, items))
        if best is None or value < best - 1e-12:
            best, best_bits = value, combo
    return best, best_bits


def _random_items(rng, count):
    items = []
    for index in range(count):
        widths = sorted(rng.choice(np.arange(1, 9), size=rng.integers(1, 5), replace=False).tolist())
        # Sizes sharing factors exercise the gcd units; values of both signs, not monotone in bits.
        size = int(rng.choice([16, 48, 64, 144, 7, 300])) * int(rng.integers(1, 4))
        items.append(AllocationItem("layer%d" % index, size,
                                    {int(b): float(rng.normal()) for b in widths}))
    return items


@pytest.mark.parametrize("seed", range(40))
def test_solver_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    items = _random_items(rng, int(rng.integers(1, 6)))
    equivalent = float(np.round(rng.uniform(1.0, 8.0), 2))
    total = sum(item.size for item in items)
    budget = math.floor(round(equivalent * 100) * total / 100)
    expected, _ = _brute_force(items, budget)
    if expected is None:
        with pytest.raises(AllocationError, match="narrowest widths already need"):
            allocation.solve(items, equivalent)
        return
    result = allocation.solve(items, equivalent)
    used = sum(result.bits[item.name] * item.size for item in items)
    assert used == result.used_bits <= budget == result.budget_bits
    assert all(result.bits[item.name] in item.sensitivities for item in items)
    objective = sum(item.sensitivities[result.bits[item.name]] for item in items)
    assert objective == pytest.approx(result.objective, abs=1e-9)
    assert objective == pytest.approx(expected, abs=1e-9)
    assert result.mean_bits == used / total


def test_budget_uses_the_decimal_value():
    # 2.3 * 10 is 22.999... in binary floating point; the budget is the decimal 23 bits.
    assert allocation.budget_bits(10, 2.3) == 23
    assert allocation.budget_bits(3, 2.5) == 7


def test_exact_where_greedy_fails():
    # Greedy by sensitivity drop per bit upgrades the big layer first and then cannot afford the two small ones.
    items = [AllocationItem("big", 4, {2: 10.0, 4: 0.0}),
             AllocationItem("a", 2, {2: 6.0, 4: 0.0}), AllocationItem("b", 2, {2: 6.0, 4: 0.0})]
    result = allocation.solve(items, 3.0)  # budget 24 bits: 2*4 + 4*2 + 4*2 = 24
    assert result.bits == {"big": 2, "a": 4, "b": 4} and result.objective == 10.0


def test_infeasible_and_malformed_inputs():
    items = [AllocationItem("x", 10, {2: 1.0, 4: 0.0})]
    with pytest.raises(AllocationError, match=r"allow 19 storage bits.*need 20"):
        allocation.solve(items, 1.9)
    with pytest.raises(AllocationError, match="listed twice"):
        allocation.solve(items + items, 4)
    with pytest.raises(AllocationError, match="finite"):
        allocation.solve([AllocationItem("x", 10, {2: float("nan")})], 4)
    with pytest.raises(AllocationError, match="cells"):
        allocation.solve([AllocationItem("x", 1, {1: 1.0, 16: 0.0}), AllocationItem("y", 2, {1: 0.0})], 16,
                         max_table_cells=10)


def test_report_carries_the_allocation():
    import json

    import tfquant
    from tfquant.report import QuantReport, ReportError
    entry = {"weight": {"equivalent_bits": 3, "budget_bits": 30, "used_bits": 28, "mean_bits": 2.8,
                        "layers": [{"name": "conv2/weights", "bits": 2, "sensitivity": {"2": 0.25, "3": 0.125}}]},
             "search_seconds": 1.25}
    report = QuantReport([], [], tfquant.QuantConfig().to_dict(), True, allocation=entry)
    back = QuantReport.from_json(report.to_json())
    assert back.allocation == entry
    table = back.format_table().splitlines()
    assert table[-2:] == ["auto bits (weight): budget 3 mean bits (30 storage bits), achieved 2.800 (28); search 1.2 s",
                          "  conv2/weights  bits 2  sensitivity by bits 2:0.25 3:0.125"]
    assert "allocation" not in json.loads(QuantReport([], [], tfquant.QuantConfig().to_dict(), True).to_json())
    data = json.loads(report.to_json())
    data["allocation"] = [1]
    with pytest.raises(ReportError, match="allocation=\\[1\\] is not valid; expected an object"):
        QuantReport.from_dict(data)
