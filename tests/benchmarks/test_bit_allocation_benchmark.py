"""benchmarks.bit_allocation --quick: auto, uniform and random rows from one float checkpoint, within budget."""
import json
import math
import os
import subprocess
import sys

from benchmarks import accuracy_table, bit_allocation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bit_allocation_quick(tmp_path):
    output, work, markdown = tmp_path / "alloc.json", tmp_path / "work", tmp_path / "BENCHMARKS.md"
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
