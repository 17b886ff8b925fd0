"""A converted model the LiteRT interpreter refuses to run is one TfquantError line, never a traceback."""
import numpy as np
import pytest

import tfquant
from tfquant.export import tflite_export


class _RefusingInterpreter:
    """Stands in for an interpreter whose XNNPACK delegate cannot reshape the graph at the requested batch."""

    def __init__(self):
        self.resized = []

    def get_input_details(self):
        return [{"index": 0, "dtype": np.float32, "quantization": (0.0, 0)}]

    def get_output_details(self):
        return [{"index": 1, "dtype": np.float32, "quantization": (0.0, 0)}]

    def resize_tensor_input(self, index, shape):
        self.resized.append(shape)

    def allocate_tensors(self):
        raise RuntimeError("XNNPack delegate failed to reshape runtime.\nNode number 12 (TfLiteXNNPackDelegate) "
                           "failed to prepare.\n")


def test_a_model_the_runtime_cannot_run_is_one_line(monkeypatch):
    interpreter = _RefusingInterpreter()
    monkeypatch.setattr(tflite_export, "make_interpreter", lambda model, num_threads=None: interpreter)
    with pytest.raises(tfquant.TfquantError) as raised:
        tflite_export.run_tflite(b"model", np.zeros((5, 4, 4, 1), np.float32), batch_size=4)
    message = str(raised.value)
    assert "\n" not in message
    assert "a batch of 4 images" in message and "XNNPack delegate failed to reshape runtime." in message
    assert interpreter.resized == [[4, 4, 4, 1]]


class _BatchOneInterpreter(_RefusingInterpreter):
    """An interpreter of a model declared at batch 1 whose reshapes hold that 1: other batches fail to allocate;
    at batch 1 its output is the image's sum (or it fails too when `runs` is False)."""

    def __init__(self, runs=True):
        super().__init__()
        self.runs, self.image = runs, None

    def get_input_details(self):
        return [{"index": 0, "dtype": np.float32, "quantization": (0.0, 0), "shape": np.array([1, 4, 4, 1])}]

    def allocate_tensors(self):
        if self.resized[-1][0] != 1 or not self.runs:
            super().allocate_tensors()

    def set_tensor(self, index, value):
        self.image = value

    def invoke(self):
        pass

    def get_tensor(self, index):
        return self.image.sum(axis=(1, 2, 3))[:, None]


def test_a_model_declared_at_batch_one_runs_one_image_at_a_time(monkeypatch):
    interpreters = []

    def make(model, num_threads=None):
        interpreters.append(_BatchOneInterpreter())
        return interpreters[-1]
    monkeypatch.setattr(tflite_export, "make_interpreter", make)
    images = np.random.default_rng(0).normal(size=(5, 4, 4, 1)).astype(np.float32)
    logits = tflite_export.run_tflite(b"model", images, batch_size=4)
    np.testing.assert_allclose(logits[:, 0], images.sum(axis=(1, 2, 3)), rtol=1e-6)
    # The batch of 4 failed; a fresh interpreter then ran each image at the declared shape.
    assert interpreters[0].resized == [[4, 4, 4, 1]] and interpreters[1].resized == [[1, 4, 4, 1]]


def test_a_model_failing_at_batch_one_too_is_one_line(monkeypatch):
    monkeypatch.setattr(tflite_export, "make_interpreter", lambda model, num_threads=None: _BatchOneInterpreter(False))
    with pytest.raises(tfquant.TfquantError, match="a batch of 1 images .*XNNPack delegate failed"):
        tflite_export.run_tflite(b"model", np.zeros((5, 4, 4, 1), np.float32), batch_size=4)
