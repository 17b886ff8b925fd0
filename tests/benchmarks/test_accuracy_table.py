"""benchmarks/accuracy_table.py --quick: rows run through the real run script from one float checkpoint."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_accuracy_table_quick(tmp_path):
    output = tmp_path / "acc.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accuracy_table.py"), "--quick",
                             "--output", str(output), "--work_dir", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.load(open(output))
    names = [row["name"] for row in data["rows"]]
    assert names == ["W8A8", "W4A4 PocketFlow behaviour (baseline)"]
    for row in data["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["test_examples"] == 200
        assert row["float_accuracy"] == data["float_accuracy"]  # one float checkpoint for every row
        # The row's own results.json agrees with what the table reports.
        slug = "".join(c if c.isalnum() else "_" for c in row["name"])
        results = json.load(open(tmp_path / "work" / slug / "results.json"))
        assert results["quant_accuracy"] == row["accuracy"] and results["compression_ratio"] == row["ratio"]
    # W8A8 with first/last float: roughly 4x smaller than float32, never less.
    assert 2.5 < data["rows"][0]["ratio"] < 4.0
    assert not os.path.exists(os.path.join(ROOT, "BENCHMARKS.md.tmp"))
    # The export table runs on the checkpoints the accuracy table left behind.
    export_json = tmp_path / "export.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "export_table.py"), "--quick",
                             "--output", str(export_json), "--work_dir", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = json.load(open(export_json))
    row = exported["rows"][0]["export"]
    files = row["files"]
    for key, name in (("packed", "model.tfq"), ("tflite_float", "model_float.tflite"),
                      ("tflite_int8", "model_int8.tflite")):
        path = tmp_path / "work" / "export_W8A8" / name
        assert files[key]["bytes"] == os.path.getsize(path)
    # The packed 8-bit model is far smaller than the float checkpoint (which also holds Momentum slots).
    assert files["packed"]["bytes"] < exported["float_checkpoint_bytes"] / 4
    assert row["accuracy"]["frozen_graph"] == row["accuracy"]["quantized_checkpoint"]
    assert row["accuracy"]["quantized_checkpoint"] == pytest.approx(data["rows"][0]["accuracy"], abs=1e-6)
