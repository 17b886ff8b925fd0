"""benchmarks.keras_ptq: the 32x32x3 Fashion-MNIST archive, the MobileNetV2 file, float / QAT / PTQ rows through
the real run scripts, and the section's tables and targets."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from benchmarks import accuracy_table, keras_ptq, publish
from nets.data import fmnist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fmnist_becomes_32x32x3_by_a_zero_border_and_a_repeated_channel():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    converted = keras_ptq.fmnist_as_rgb32(images)
    expected = np.zeros((3, 32, 32, 3), np.uint8)
    for channel in range(3):
        expected[:, 2:30, 2:30, channel] = images
    assert converted.dtype == np.uint8
    np.testing.assert_array_equal(converted, expected)


def test_epoch_seconds_come_from_the_logged_throughput_without_the_warm_up_window():
    stdout = "\n".join(["uniform iter 100/900 | loss 1 | acc 0.5 | lr 0.01 | 50 img/s | remaining 1m",
                        "full-prec iter 100/900 | loss 1 | acc 0.5 | lr 0.01 | 10 img/s | remaining 1m",
                        "full-prec iter 200/900 | loss 1 | acc 0.5 | lr 0.01 | 400 img/s | remaining 1m",
                        "full-prec iter 300/900 | loss 1 | acc 0.5 | lr 0.01 | 600 img/s | remaining 1m",
                        "full-prec iter 400/900 | loss 1 | acc 0.5 | lr 0.01 | 500 img/s | remaining 1m"])
    assert keras_ptq.epoch_seconds(stdout, "full-prec", 60000) == pytest.approx(60000 / 500)
    assert keras_ptq.epoch_seconds(stdout, "uniform", 1000) == pytest.approx(1000 / 50)
    assert keras_ptq.epoch_seconds("nothing logged", "uniform", 1000) is None


def ptq_entry(model, bits, calibrator, accuracy, float_accuracy, calib_seconds):
    return {"model": model, "method": "ptq", "bits": bits, "calibrator": calibrator, "accuracy": accuracy,
            "float_accuracy": float_accuracy, "calib_seconds": calib_seconds, "calib_batches": 20}


def test_section_tables_and_targets():
    entries = [{"model": "keras", "method": "float", "epoch_seconds": 100.0},
               {"model": "keras", "method": "qat", "bits": "W4A8", "accuracy": 0.880, "float_accuracy": 0.889,
                "epoch_seconds": 150.0},
               ptq_entry("keras", "W8A8", "max", 0.870, 0.889, 5.0),
               ptq_entry("keras", "W8A8", "entropy", 0.8885, 0.889, 120.0),
               ptq_entry("resnet20", "W8A8", "mse", 0.910, 0.916, 9.0),
               ptq_entry("resnet20", "W4A8", "max", 0.800, 0.916, 3.0),
               {"model": "resnet20", "method": "qat", "bits": "W4A8", "accuracy": 0.912, "float_accuracy": 0.916,
                "epoch_seconds": 200.0}]
    payload = {"entries": entries, "budget": keras_ptq.FULL, "keras_parameters": 423018, "load_before": [0.1, 0, 0],
               "machine": {"cores": 2, "cpu": "c", "tensorflow": "t", "python": "p", "date": "d",
                           "load_average": [0.1, 0, 0]}}
    text = keras_ptq.render(payload, "cmd")
    assert "| ResNet-20 | W8A8 | 91.60 | - | - | 91.00 | - | - |" in text
    assert "| ResNet-20 | W4A8 | 91.60 | 80.00 | - | - | - | 91.20 |" in text
    assert "| Keras MobileNetV2-0.35 | W8A8 | 88.90 | 87.00 | - | - | 88.85 | - |" in text
    assert "| Keras MobileNetV2-0.35 | W4A8 | 88.90 | - | - | - | - | 88.00 |" in text
    # Calibration times against the float epoch when one was trained, else the QAT epoch.
    assert "| Keras MobileNetV2-0.35 | W8A8 | 5.0 | - | - | 120.0 | 100 (float) |" in text
    assert "| ResNet-20 | W4A8 | 3.0 | - | - | - | 200 (qat) |" in text
    assert "423018 parameters" in text
    assert "Keras W4A8 (QAT) within 1 point of its float accuracy: met (-0.90)" in text
    assert "ResNet-20: best calibrator at W8A8 within 0.3 point of float: **not met** (mse, -0.60)" in text
    assert "Keras MobileNetV2-0.35: best calibrator at W8A8 within 0.3 point of float: met (entropy, -0.05)" in text
    assert "Keras MobileNetV2-0.35: calibration over 20 batches faster than one training epoch: **not met**" in text
    assert "ResNet-20: calibration over 20 batches faster than one training epoch: met" in text
    # A run that trained ResNet-20's float model first logged its float throughput: that epoch is the one used.
    entries[-1]["float_epoch_seconds"] = 8.0
    assert "| ResNet-20 | W8A8 | - | - | 9.0 | - | 8 (float) |" in keras_ptq.render(payload, "cmd")
    entries.append(ptq_entry("keras", "W4A8", "mse", 0.5, 0.7, 1.0))
    with pytest.raises(publish.BenchmarkError, match="different float accuracies"):
        keras_ptq.render(payload, "cmd")
    with pytest.raises(publish.BenchmarkError, match="--qat=keras:W2A8"):
        keras_ptq.parse_qat("keras:W2A8")
    assert keras_ptq.parse_qat("keras:W8A8, resnet20:W4A8") == [("keras", "W8A8"), ("resnet20", "W4A8")]


def run_dir(work, entry):
    """Where the benchmark ran an entry: <work>/<model>/<slug of 'method bits [calibrator]'>."""
    label = " ".join([entry["method"], entry["bits"]] + ([entry["calibrator"]] if "calibrator" in entry else []))
    return work / entry["model"] / accuracy_table.slug(label)


def test_keras_ptq_quick(tmp_path):
    output, work, markdown = tmp_path / "kp.json", tmp_path / "work", tmp_path / "BENCHMARKS.md"
    done = subprocess.run([sys.executable, "-m", "benchmarks.keras_ptq", "--quick", "--output", str(output),
                           "--work_dir", str(work), "--markdown", str(markdown)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not markdown.exists()
    data = json.loads(output.read_text())
    quick = keras_ptq.QUICK
    assert [(e["model"], e["method"], e.get("bits"), e.get("calibrator")) for e in data["entries"]] == (
        [("keras", "float", None, None)] + [(m, "qat", b, None) for m, b in quick["qat"]]
        + [(m, "ptq", b, c) for m, b, c in quick["ptq"]])

    # The archive is the project's Fashion-MNIST reader's first images, bordered and made three-channel.
    reference = fmnist.load_fmnist()
    archive = np.load(str(work / "keras" / "fmnist32_1024_200.npz"))
    assert archive["x_train"].shape == (1024, 32, 32, 3) and archive["x_test"].shape == (200, 32, 32, 3)
    for split, count in (("train", 1024), ("test", 200)):
        images = archive["x_%s" % split]
        assert not images[:, :2].any() and not images[:, 30:].any() and not images[:, :, :2].any()
        for channel in range(3):
            np.testing.assert_array_equal(images[:, 2:30, 2:30, channel], reference["%s_images" % split][:count])
        np.testing.assert_array_equal(archive["y_%s" % split], reference["%s_labels" % split][:count])

    # The model file: MobileNetV2 at alpha 0.35 (first conv 16 filters) on 32x32x3 inputs, 10 classes.
    with h5py.File(str(work / "keras" / "mobilenet_v2_035.h5"), "r") as handle:
        config = json.loads(handle.attrs["model_config"])
    layers = {layer["config"]["name"]: layer for layer in config["config"]["layers"]}
    assert layers["input_1"]["config"]["batch_input_shape"] == [None, 32, 32, 3]
    assert layers["Conv1"]["config"]["filters"] == 16
    assert layers["predictions"]["config"]["units"] == 10
    assert sum(layer["class_name"] == "DepthwiseConv2D" for layer in config["config"]["layers"]) == 17
    assert data["keras_parameters"] == keras_ptq.count_weights(str(work / "keras" / "mobilenet_v2_035.h5")) > 0

    assert data["entries"][0]["epoch_seconds"] > 0
    for entry in data["entries"][1:]:
        results = json.loads((run_dir(work, entry) / "results.json").read_text())
        assert results["quant_accuracy"] == entry["accuracy"] and results["float_accuracy"] == entry["float_accuracy"]
        assert entry["test_examples"] == results["test_examples"] == 200
        report = json.loads((run_dir(work, entry) / "quant_report.json").read_text())
        weight_bits = int(entry["bits"][1])
        assert report["config"]["weight_bits"] == weight_bits and report["config"]["activation_bits"] == 8
        assert report["config"]["bucket_type"] == "channel" and report["config"]["use_buckets"]
        if entry["method"] == "ptq":
            assert results["calibrator"] == entry["calibrator"]
            assert results["calib_seconds"] == entry["calib_seconds"] > 0
            assert results["calib_batches"] == entry["calib_batches"] == quick["calib_batches"]
        else:
            assert entry["epoch_seconds"] > 0 and entry["epochs"] == quick["keras_qat_epochs"]
    # Quick runs the Keras rows only (the suite's time): no ResNet-20 float model is trained.
    assert not [e for e in data["entries"] if e["model"] == "resnet20"]
    assert not (work / "resnet20" / "float").exists()
    # Every Keras row starts from the one float checkpoint the float run trained (its last step).
    keras_rows = [e for e in data["entries"][1:] if e["model"] == "keras"]
    assert len({e["float_accuracy"] for e in keras_rows}) == 1
    for entry in keras_rows:
        results = json.loads((run_dir(work, entry) / "results.json").read_text())
        assert os.path.basename(results["float_checkpoint"]) == "model.ckpt-8"  # 0.25 epoch of 1024 at batch 32
