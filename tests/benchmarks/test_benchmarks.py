"""Run each benchmark with --quick in a subprocess and check what it reports is complete and consistent;
check the busy-machine rule and the section writer with injected load readings.

Timings are never compared with thresholds: these tests run on loaded machines. They check that every
expected mode is there, every time is a positive finite number, and every ratio is the reported time
divided by the reported float time.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import machine, publish, rewrite_cost, stats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Generous: the quick modes take well under a minute on an idle 2-core machine, far more when shared.
TIMEOUT_S = 1200
QUIET, BUSY = [0.25, 0.5, 0.5], [7.5, 3.0, 2.0]


def run_quick(module, tmp_path, *extra):
    """Run `python -m benchmarks.<module> --quick` as the docs say; returns its JSON."""
    output = tmp_path / "result.json"
    markdown = tmp_path / "BENCHMARKS.md"
    command = [sys.executable, "-m", "benchmarks." + module, "--quick",
               "--output", str(output), "--markdown", str(markdown)] + list(extra)
    done = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    # --quick must leave every BENCHMARKS.md alone, whatever the load.
    assert not markdown.exists()
    with open(output) as handle:
        return json.load(handle)


def positive_finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_train_overhead_quick(tmp_path):
    from benchmarks import train_overhead
    result = run_quick("train_overhead", tmp_path)
    modes = result["modes"]
    assert result["quick"] is True
    assert set(modes) == set(train_overhead.QUICK_MODES)
    rounds_run = result["timing"]["rounds"]
    # --quick: at least 2 rounds (an interval needs two), at most its cap of 3.
    assert 2 <= rounds_run <= 3 and result["rounds"] == rounds_run
    float_entry = modes["float"]
    for name, entry in modes.items():
        assert entry["steps"] == len(entry["times_s"]) == len(entry["cpu_times_s"]) == rounds_run * result["steps_per_round"]
        assert all(positive_finite(t) for t in entry["times_s"]), name
        assert all(t >= 0 and math.isfinite(t) for t in entry["cpu_times_s"]), name
        assert entry["median_s"] == pytest.approx(stats.median(entry["times_s"]), rel=1e-12)
        assert entry["cpu_median_s"] == pytest.approx(stats.median(entry["cpu_times_s"]), rel=1e-12)
        # Round medians in run order; the ratio is the mean of round ratios, its interval the t-interval.
        steps = result["steps_per_round"]
        assert entry["round_medians_s"] == pytest.approx(
            [stats.median(entry["times_s"][r * steps:(r + 1) * steps]) for r in range(rounds_run)], rel=1e-12)
        ratios = [m / f for m, f in zip(entry["round_medians_s"], float_entry["round_medians_s"])]
        assert entry["ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-9), name
        assert_t_interval(ratios, entry["ratio_low"], entry["ratio_high"])
        assert entry["cpu_ratio"] == pytest.approx(entry["cpu_median_s"] / float_entry["cpu_median_s"], rel=1e-9)
        assert result["graphs"][name]["ops"] > 0
    assert float_entry["ratio"] == pytest.approx(1.0)
    # Quantized graphs hold more ops than the float one: the rewrite really happened.
    assert all(result["graphs"][m]["ops"] > result["graphs"]["float"]["ops"] for m in modes if m != "float")
    targets = result["targets"]
    assert {t["target"] for t in targets} == {"channel W4A4 <= 1.05x float", "split-256 <= 1.08x float",
                                              "folded <= 1.08x float", "below the fused peer"}
    for target in targets:
        mine, reference = modes[target["mode"]], modes[target["reference"]]
        ratios = [m / r for m, r in zip(mine["round_medians_s"], reference["round_medians_s"])]
        assert target["ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-9)
        assert_t_interval(ratios, target["low"], target["high"])
        assert target["upper_limit"] == pytest.approx(target["limit"] + 0.02)
        assert target["met"] == (target["ratio"] <= target["limit"] and target["high"] <= target["upper_limit"])
    widest = max((((m["ratio_high"] - m["ratio_low"]) / 2 / m["ratio"]), n) for n, m in modes.items() if n != "float")
    assert result["timing"]["widest"][0] == pytest.approx(widest[0], rel=1e-9)
    assert result["timing"]["reached"] == (widest[0] <= result["precision"])
    assert result["command"].startswith(".venv/bin/python -m benchmarks.train_overhead --quick")


def assert_t_interval(values, low, high):
    """low/high are the 95 % t-interval of the mean of values (t quantiles from the standard table)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = table[n - 1] * std / math.sqrt(n)
    assert low == pytest.approx(mean - half, rel=1e-9, abs=1e-12)
    assert high == pytest.approx(mean + half, rel=1e-9, abs=1e-12)


def test_rewrite_cost_quick(tmp_path):
    result = run_quick("rewrite_cost", tmp_path)
    sizes = result["sizes"]
    assert [s["resnet_size"] for s in sizes] == list(rewrite_cost.QUICK_SIZES)
    assert result["batch_size"] == rewrite_cost.QUICK_BATCH
    for row in sizes:
        assert row["ops_before"] > 0 and row["ops_after"] > row["ops_before"]
        assert row["quantized_layers"] > 0
        # Interleaved rounds: one float build and one rewrite per round.
        for key in ("times_s", "cpu_times_s", "build_times_s", "build_cpu_times_s", "round_ratios_cpu"):
            assert len(row[key]) == result["repeats"], key
            assert all(positive_finite(t) for t in row[key]), key
        assert row["median_s"] == pytest.approx(stats.median(row["times_s"]), rel=1e-12)
        assert row["median_build_cpu_s"] == pytest.approx(stats.median(row["build_cpu_times_s"]), rel=1e-12)
        assert row["ratio_cpu"] == pytest.approx(row["median_cpu_s"] / row["median_build_cpu_s"], rel=1e-9)
        assert row["ratio_wall"] == pytest.approx(row["median_s"] / row["median_build_s"], rel=1e-9)
        assert row["round_ratios_cpu"] == pytest.approx(
            [c / b for c, b in zip(row["cpu_times_s"], row["build_cpu_times_s"])], rel=1e-9)
        assert row["ops_per_s"] == pytest.approx(row["ops_before"] / row["median_s"], rel=1e-9)
        assert row["ops_per_cpu_s"] == pytest.approx(row["ops_before"] / row["median_cpu_s"], rel=1e-9)
    # Deeper networks have more ops, before and after the rewrite.
    assert sizes[0]["ops_before"] < sizes[1]["ops_before"]
    rates = [row["ops_per_cpu_s"] for row in sizes]
    assert result["linear"]["spread"] == pytest.approx(max(rates) / min(rates), rel=1e-9)
    assert result["largest_within_target"] == (sizes[-1]["ratio_cpu"] <= rewrite_cost.RATIO_TARGET)
    profile = result["profile"]
    assert profile["resnet_size"] == sizes[-1]["resnet_size"]
    # The profiled rewrite adds what the timed ones added, counted by op type.
    assert sum(profile["added_op_types"].values()) == sizes[-1]["ops_after"] - sizes[-1]["ops_before"]
    assert profile["weights"] > 0 and profile["activations"] > 0
    top = profile["top_functions"]
    assert len(top) == rewrite_cost.PROFILE_TOP
    owns = [entry["own_s"] for entry in top]
    assert owns == sorted(owns, reverse=True)
    for entry in top:
        assert entry["calls"] > 0 and entry["function"]
        assert 0 <= entry["own_s"] <= entry["cumulative_s"] + 1e-9
    assert sum(owns) <= profile["total_s"] * 1.01


def test_memory_quick(tmp_path):
    from benchmarks import memory
    result = run_quick("memory", tmp_path)
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
    publish.write_section("first", "one", path)
    publish.write_section("second", "two", path)
    with open(path) as handle:
        before = handle.read()
    publish.write_section("first", "uno \\1 $1", path)
    with open(path) as handle:
        after = handle.read()
    assert "<!-- BEGIN first -->\nuno \\1 $1\n<!-- END first -->" in after
    assert "one" not in after
    # The other section and the header are untouched, byte for byte.
    assert after.split("<!-- BEGIN second -->")[1] == before.split("<!-- BEGIN second -->")[1]
    assert after.split("<!-- BEGIN first -->")[0] == before.split("<!-- BEGIN first -->")[0]


@pytest.mark.parametrize("load_before,load_after,cores,busy", [
    (QUIET, QUIET, 2, False),
    ([1.0, 9, 9], [1.0, 9, 9], 2, False),   # exactly half the cores is not busy; 5/15-minute figures ignored
    ([1.01, 0, 0], QUIET, 2, True),         # busy at the start
    (QUIET, [1.01, 0, 0], 2, True),         # busy at the end
    ([3.9, 0, 0], [3.9, 0, 0], 8, False),
    (None, None, 2, False),                 # no reading on this OS: nothing to refuse on
])
def test_busy_rule_uses_the_one_minute_load_against_half_the_cores(load_before, load_after, cores, busy):
    assert bool(machine.busy_readings(load_before, load_after, cores)) == busy
    if busy:
        with pytest.raises(publish.BenchmarkError, match="busy"):
            publish.check_quiet(load_before, load_after, False, cores)
    assert publish.check_quiet(load_before, load_after, True, cores) == busy


def test_publish_refuses_a_busy_machine_unless_allowed_and_then_marks_the_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    publish.write_section("other", "kept", str(path))
    before = path.read_bytes()
    info = {"cores": machine.cores(), "cpu": "cpu", "tensorflow": "2", "python": "3", "date": "today",
            "load_average": [machine.cores() * 0.75, 0, 0]}
    body = "\n".join(machine.machine_lines(info, QUIET))
    with pytest.raises(publish.BenchmarkError, match="at the end"):
        publish.publish("mine", body, str(path), QUIET, info["load_average"], allow_busy=False)
    assert path.read_bytes() == before
    publish.publish("mine", body, str(path), QUIET, info["load_average"], allow_busy=True)
    text = path.read_text()
    assert "**Measured on a busy machine**" in text and "<!-- BEGIN other -->\nkept\n" in text
    quiet_lines = machine.machine_lines(dict(info, load_average=QUIET), QUIET)
    assert not any("busy" in line for line in quiet_lines)


def test_a_full_run_on_a_busy_machine_stops_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(machine, "read_load", lambda: BUSY)
    markdown, output = tmp_path / "BENCHMARKS.md", tmp_path / "out.json"
    with pytest.raises(SystemExit) as stopped:
        publish.run_main(lambda: rewrite_cost.main(["--markdown", str(markdown), "--output", str(output)]))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: the machine is busy (1-minute load average 7.50 at the start")
    assert not markdown.exists() and not output.exists()


def test_end_load_waits_for_the_runs_own_load_to_fade(monkeypatch):
    readings = iter([BUSY, BUSY, QUIET, BUSY])
    naps = []
    monkeypatch.setattr(machine, "read_load", lambda: next(readings))
    monkeypatch.setattr(machine.time, "sleep", naps.append)
    monkeypatch.setattr(machine, "cores", lambda: 2)
    assert machine.end_load() == QUIET and len(naps) == 2
    # A quick run reads once; a load that never fades is returned as read when the wait is over.
    monkeypatch.setattr(machine, "read_load", lambda: BUSY)
    assert machine.end_load(quick=True) == BUSY and len(naps) == 2
    monkeypatch.setattr(machine, "SETTLE_SECONDS", 0)
    assert machine.end_load() == BUSY and len(naps) == 2


def test_busy_at_the_end_keeps_the_results_but_not_the_section(tmp_path, monkeypatch):
    readings = iter([QUIET] + [BUSY] * 5)
    monkeypatch.setattr(machine, "read_load", lambda: next(readings))
    monkeypatch.setattr(machine, "SETTLE_SECONDS", 0)  # the busy reading stays: nothing else to wait for
    markdown, output = tmp_path / "BENCHMARKS.md", tmp_path / "out.json"
    argv = ["--markdown", str(markdown), "--output", str(output), "--sizes", "20", "--repeats", "1",
            "--batch_size", "2"]
    with pytest.raises(publish.BenchmarkError, match="at the end"):
        rewrite_cost.main(argv)
    assert not markdown.exists()
    saved = json.loads(output.read_text())
    assert saved["quick"] is False and saved["load_before"] == QUIET and saved["machine"]["load_average"] == BUSY
    # The saved results publish later only when explicitly allowed, and the section then says so.
    with pytest.raises(publish.BenchmarkError):
        rewrite_cost.main(["--render_json", str(output), "--markdown", str(markdown)])
    rewrite_cost.main(["--render_json", str(output), "--markdown", str(markdown), "--allow_busy"])
    assert "**Measured on a busy machine** (1-minute load average 7.50 at the end" in markdown.read_text()


def test_command_line_is_the_module_form():
    argv = [os.path.join(REPO_ROOT, "benchmarks", "memory.py"), "--output", "x.json"]
    assert publish.command_line(argv) == ".venv/bin/python -m benchmarks.memory --output x.json"


def test_a_full_run_keeps_its_results_beside_the_section_it_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "read_load", lambda: QUIET)
    monkeypatch.setattr(machine, "SETTLE_SECONDS", 0)
    monkeypatch.setattr(publish, "RESULTS_DIR", str(tmp_path / "results"))
    markdown = tmp_path / "BENCHMARKS.md"
    rewrite_cost.main(["--markdown", str(markdown), "--sizes", "20", "--repeats", "1", "--batch_size", "2"])
    saved = json.loads((tmp_path / "results" / "rewrite_cost.json").read_text())
    assert saved["quick"] is False and saved["load_before"] == QUIET
    # The saved file renders the very section the run wrote.
    rendered = tmp_path / "rendered.md"
    rewrite_cost.main(["--render_json", str(tmp_path / "results" / "rewrite_cost.json"), "--markdown", str(rendered)])
    assert rendered.read_text() == markdown.read_text()


@pytest.mark.parametrize("output, quick, expected", [
    ("x.json", True, "x.json"), ("x.json", False, "x.json"), (None, True, None), (None, False, "results/s.json")])
def test_results_path(monkeypatch, output, quick, expected):
    import argparse
    monkeypatch.setattr(publish, "RESULTS_DIR", "results")
    assert publish.results_path(argparse.Namespace(output=output, quick=quick), "s") == expected
