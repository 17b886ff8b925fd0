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
