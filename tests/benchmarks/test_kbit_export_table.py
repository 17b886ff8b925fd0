"""benchmarks.export_table --kbit --quick: a tiny block-bucket MLP exported and measured as the full table is."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import kbit_files, machine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def test_kbit_table_quick_measures_every_file(tmp_path):
    output = tmp_path / "kbit.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.export_table", "--kbit", "--quick", "--work_dir",
                           str(tmp_path / "work"), "--output", str(output)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(output.read_text())
    export_dir = tmp_path / "work" / "export_mlp_w4_block"
    report = json.loads((export_dir / "export.json").read_text())
    accounted = report["packed"]["total_storage_bits"] / 8
    rows = {row["name"]: row for row in payload["rows"]}
    assert set(rows) == {"model_float.onnx", "model.onnx", "model_float_ort.onnx", "model_ort.onnx"}
    for name, row in rows.items():
        data_file = export_dir / (name + ".data")  # the offline-optimized files' weights, beside them
        assert row["bytes"] == os.path.getsize(export_dir / name) + (
            os.path.getsize(data_file) if name.endswith("_ort.onnx") else 0)
        assert row["over_accounted"] == pytest.approx(row["bytes"] / accounted)
        assert row["rss_added_kb"] > 0 and all(v > 0 for v in row["latency_ms"].values())
        assert set(row["latency_ms"]) == {"b1_t1", "b32_t1", "b1_tall", "b32_tall"}
        # After a one-op session onnxruntime's first-session cost is in the baseline, not in the reading.
        assert 0 < row["rss_added_warm_kb"] < row["rss_added_kb"]
        assert row["rss_added_lean_kb"] > 0 and row["heap_added_kb"] > 0
        assert 0 < row["rss_added_lean_warm_kb"] < row["rss_added_lean_kb"]
    # The files onnxruntime optimized offline compute what their sources do and hold the fused kernels.
    for name, compared in payload["offline_optimized"].items():
        assert compared["top1_agreement"] == 1.0 and compared["max_abs_logit_diff"] == 0.0, name
    optimized = onnx.load(str(export_dir / "model_ort.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in optimized.graph.initializer)
    assert sum(node.op_type == "MatMulNBits" for node in optimized.graph.node) == 2  # the MLP's two MatMuls
    assert report["onnx"]["session"]["config"] == {"session.qdq_matmulnbits_accuracy_level": "0"}
    kbit = rows["model.onnx"]
    assert kbit["agreement"] == report["agreement_with_quantized_tf"]["onnx"] == 1.0
    assert kbit["disagreements"] == report["disagreements_with_quantized_tf"]["onnx"]
    assert kbit["bytes"] < rows["model_float.onnx"]["bytes"] / 3  # 4-bit codes against float32 weights
    checks = {what: met for what, _, _, met in kbit_files.targets(payload)}
    fused = [what for what in checks if "MatMulNBits" in what]
    assert fused and checks[fused[0]]  # every MatMul of the MLP runs as MatMulNBits(bits=4)
    text = kbit_files.render(payload, "cmd", machine.machine_lines(payload["machine"], payload["load_before"]))
    assert "| MLP W4 block/16 | ONNX k-bit | %d |" % kbit["bytes"] in text
    assert "| MLP W4 block/16 | ONNX k-bit | %.1f (" % (kbit["rss_added_kb"] / 1024.0) in text  # memory table


def test_disagreement_notes_give_the_tf_graphs_margins():
    """The table's notes state export.json's disagreement records: counts per margin in whole output steps (counted
    here from the logits), or the margins themselves for float logits."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from tfquant.export import divergence  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(3)
    step = np.float32(0.05)
    reference = rng.integers(0, 200, size=(500, 10)).astype(np.float32) * step
    logits = reference + rng.integers(-2, 3, size=reference.shape).astype(np.float32) * step
    quantized = divergence.disagreements(reference, logits)
    assert 0 < quantized["images"] <= divergence.MARGINS_KEPT  # every margin listed
    float_reference = rng.normal(size=(40, 10)).astype(np.float32)
    floats = divergence.disagreements(float_reference, float_reference + rng.normal(
        scale=0.3, size=float_reference.shape).astype(np.float32))
    rows = [{"model": "M", "file": "ONNX k-bit", "disagreements": quantized},
            {"model": "M", "file": "TFLite int8", "disagreements": floats},
            {"model": "M", "file": "ONNX float", "disagreements": None}]
    lines = kbit_files.disagreement_lines({"rows": rows})
    assert len(lines) == 5 and lines[-1] == ""
    differ = logits.argmax(1) != reference.argmax(1)
    top_two = np.sort(reference[differ], axis=1)[:, -2:]
    steps = np.round((top_two[:, 1] - top_two[:, 0]) / step).astype(int)
    counts = ", ".join("%d: %d" % (value, np.sum(steps == value)) for value in np.unique(steps))
    assert lines[2] == ("- M, ONNX k-bit: %d images differ (%d tied); the TF graph's margin on them, in output steps "
                        "of 0.05: %s; largest %d" % (differ.sum(), quantized["tied"], counts, steps.max()))
    largest = sorted(floats["tf_margins"])[-1]
    assert lines[3].startswith("- M, TFLite int8: %d images differ" % floats["images"])
    assert lines[3].endswith("; largest %.4g" % largest) and "in logits:" in lines[3]
    assert kbit_files.disagreement_lines({"rows": rows[2:]}) == []


def test_a_second_run_exports_into_its_own_export_directory_again(tmp_path):
    """The table adds model_float.onnx (and the offline-optimized files) to the MLP's export directory; running it
    again over the same work dir exports there again, and a directory holding anything else is refused in one
    line naming the file."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from benchmarks import publish  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    npz = str(tmp_path / "data.npz")
    np.savez(npz, x_test=images[:32], y_test=labels[:32], x_train=images[32:])
    run_dir, out = tmp_path / "run", str(tmp_path / "export")
    run_dir.mkdir()
    kbit_files.train_mlp(str(run_dir), dict(kbit_files.MLP_QUICK, steps=2), images, labels)
    kbit_files.export(str(run_dir), out, npz, ["--onnx"], True)
    kbit_files.float_onnx(out)
    open(os.path.join(out, "model_ort.onnx.data"), "wb").close()  # as write_offline_optimized leaves it
    data = kbit_files.export(str(run_dir), out, npz, ["--onnx"], True)
    assert data["agreement_with_quantized_tf"]["onnx"] == 1.0
    assert not os.path.exists(os.path.join(out, "model_float.onnx"))
    open(os.path.join(out, "notes.txt"), "w").close()
    with pytest.raises(publish.BenchmarkError) as refused:
        kbit_files.export(str(run_dir), out, npz, ["--onnx"], True)
    message = str(refused.value)
    assert "\n" not in message and "notes.txt" in message and "not part of an export" in message
