"""Run each benchmark with --quick in a subprocess and check what it reports is complete and consistent.

Timings are never compared with thresholds: these tests run on loaded CI machines. They check that
every expected mode is there, every time is a positive finite number, and every ratio is the
reported time divided by the reported float time.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Generous: the quick modes take well under a minute on an idle 2-core machine, far more when shared.
TIMEOUT_S = 1200


def run_quick(script, tmp_path, *extra):
    output = tmp_path / "result.json"
    markdown = tmp_path / "BENCHMARKS.md"
    command = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", script), "--quick",
               "--output", str(output), "--markdown", str(markdown)] + list(extra)
    done = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    # --quick must leave every BENCHMARKS.md alone.
    assert not markdown.exists()
    with open(output) as handle:
        return json.load(handle)


def positive_finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_train_overhead_quick(tmp_path):
    from benchmarks import train_overhead
    result = run_quick("train_overhead.py", tmp_path)
    modes = result["modes"]
    assert result["quick"] is True
    assert set(modes) == set(train_overhead.QUICK_MODES)
    float_median = modes["float"]["median_s"]
    assert positive_finite(float_median)
    for name, entry in modes.items():
        assert entry["steps"] == len(entry["times_s"]) == result["rounds"] * result["steps_per_round"]
        assert all(positive_finite(t) for t in entry["times_s"]), name
        assert entry["median_s"] == pytest.approx(common.median(entry["times_s"]), rel=1e-12)
        assert entry["ratio"] == pytest.approx(entry["median_s"] / float_median, rel=1e-9), name
        assert positive_finite(entry["median_round_ratio"])
        assert result["graphs"][name]["ops"] > 0
    assert modes["float"]["ratio"] == pytest.approx(1.0)
    # Quantized graphs hold more ops than the float one: the rewrite really happened.
    assert all(result["graphs"][m]["ops"] > result["graphs"]["float"]["ops"] for m in modes if m != "float")
    assert result["targets"]
    for target in result["targets"]:
        assert target["ratio"] == pytest.approx(modes[target["mode"]]["ratio"], rel=1e-12)
        assert target["met"] == (target["ratio"] <= target["limit"])


def test_rewrite_cost_quick(tmp_path):
    from benchmarks import rewrite_cost
    result = run_quick("rewrite_cost.py", tmp_path)
    sizes = result["sizes"]
    assert [s["resnet_size"] for s in sizes] == list(rewrite_cost.QUICK_SIZES)
    for row in sizes:
        assert row["ops_before"] > 0 and row["ops_after"] > row["ops_before"]
        assert row["quantized_layers"] > 0
        assert len(row["times_s"]) == len(row["cpu_times_s"]) == result["repeats"]
        assert all(positive_finite(t) for t in row["times_s"] + row["cpu_times_s"])
        assert row["median_s"] == pytest.approx(common.median(row["times_s"]), rel=1e-12)
        assert row["ops_per_s"] == pytest.approx(row["ops_before"] / row["median_s"], rel=1e-9)
        assert row["ops_per_cpu_s"] == pytest.approx(row["ops_before"] / row["median_cpu_s"], rel=1e-9)
    # Deeper networks have more ops, before and after the rewrite.
    assert sizes[0]["ops_before"] < sizes[1]["ops_before"]
    rates = [row["ops_per_cpu_s"] for row in sizes]
    assert result["linear"]["spread"] == pytest.approx(max(rates) / min(rates), rel=1e-9)


def test_memory_quick(tmp_path):
    from benchmarks import memory
    result = run_quick("memory.py", tmp_path)
    modes = result["modes"]
    assert set(modes) == set(memory.MODES)
    assert result["ratios"]["peer_peak"] == pytest.approx(
        modes[memory.PEER]["peak_kb"] / modes[memory.FLOAT]["peak_kb"], rel=1e-9)
    for name, entry in modes.items():
        for key in ("after_import_kb", "after_build_kb", "peak_after_build_kb", "after_steps_kb", "peak_kb"):
            assert positive_finite(entry[key]), (name, key)
        # ru_maxrss is a running maximum; training cannot lower it.
        assert entry["peak_kb"] >= entry["peak_after_build_kb"]
    assert len(result["runs"]) == len(memory.MODES) * result["repeats"]
    base, quant = modes[memory.FLOAT], modes[memory.QUANT]
    assert result["ratios"]["peak"] == pytest.approx(quant["peak_kb"] / base["peak_kb"], rel=1e-9)
    assert result["ratios"]["after_build"] == pytest.approx(quant["after_build_kb"] / base["after_build_kb"],
                                                             rel=1e-9)


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = str(tmp_path / "BENCHMARKS.md")
    common.write_section("first", "one", path)
    common.write_section("second", "two", path)
    with open(path) as handle:
        before = handle.read()
    common.write_section("first", "uno \\1 $1", path)
    with open(path) as handle:
        after = handle.read()
    assert "<!-- BEGIN first -->\nuno \\1 $1\n<!-- END first -->" in after
    assert "one" not in after
    # The other section and the header are untouched, byte for byte.
    assert after.split("<!-- BEGIN second -->")[1] == before.split("<!-- BEGIN second -->")[1]
    assert after.split("<!-- BEGIN first -->")[0] == before.split("<!-- BEGIN first -->")[0]
