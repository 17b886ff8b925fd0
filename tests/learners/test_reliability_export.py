"""Two exports of one checkpoint are byte-identical, file by file, so users can checksum them."""
import os
import subprocess
import sys

import numpy as np

from tests.learners.test_end_to_end import ROOT
from tests.tfquant.test_export import IMAGE_SHAPE, _save_quantized, _synthetic_data, forward
import tfquant
from tfquant.export import inference_graph

CONFIG = tfquant.QuantConfig(weight_bits=4, activation_bits=8, quantize_all_layers=True)


def _export(run, npz, output):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-m", "tfquant.export", "--checkpoint_dir", str(run), "--output_dir",
                             str(output), "--eval_npz", str(npz), "--tflite", "--latency_images", "0"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: (output / name).read_bytes() for name in sorted(os.listdir(output))}


def test_two_exports_of_one_checkpoint_are_byte_identical(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _save_quantized(str(run), CONFIG, np.random.default_rng(0), train_steps=5)
    inference_graph.save_inference_graph(str(run), lambda images: forward(images, False), [None] + IMAGE_SHAPE)
    images, labels = _synthetic_data(np.random.default_rng(1), 40)
    np.savez(tmp_path / "data.npz", x_test=images, y_test=labels)
    first = _export(run, tmp_path / "data.npz", tmp_path / "first")
    second = _export(run, tmp_path / "data.npz", tmp_path / "second")
    assert sorted(first) == ["export.json", "inference.pb", "model.tfq", "model_float.tflite"]
    for name in first:
        assert first[name] == second[name], name
