"""Damaged .tflite / .onnx files read back: one ModelFileError line naming the file and what was expected, never a
traceback from the runtimes and never logits reported for a file that differs from what its export recorded.

One tiny model of each format is built once for the module (a Dense layer: 8 inputs, 3 classes); the fuzz loop
damages it with a fixed seed (truncation, bit flips, zeroed bytes, random bytes, the other format) and reads it
back through every read-back path: an export directory checked against its export.json (model_files.load_export),
and a file given by path to the runners (tflite_export.run_tflite, onnx_export.run_onnx, the int8 divergence's
interpreter), whose logits are compared with NumPy's x @ W + b when the damaged file still loads.
"""
import errno
import hashlib
import json
import os
import random

import numpy as np
import pytest
import tensorflow as tf

from tfquant import files
from tfquant.export import model_files, onnx_export, tflite_export

CASES = 40
RNG = np.random.default_rng(0)
WEIGHTS = RNG.normal(size=(8, 3)).astype(np.float32)
BIAS = RNG.normal(size=3).astype(np.float32)
IMAGES = RNG.normal(size=(5, 8)).astype(np.float32)
NAMES = {"tflite": "model_float.tflite", "onnx": "model.onnx"}
KEYS = {"tflite": "tflite_float", "onnx": "onnx"}


def _tflite_bytes():
    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def dense(x):
        return tf.matmul(x, WEIGHTS) + BIAS
    return tf.lite.TFLiteConverter.from_concrete_functions([dense.get_concrete_function()], dense).convert()


def _onnx_bytes():
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(WEIGHTS, "w"), numpy_helper.from_array(BIAS, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def models():
    built = {"tflite": _tflite_bytes(), "onnx": _onnx_bytes()}
    reference = IMAGES @ WEIGHTS + BIAS
    # The intact files run, and compute x @ W + b: the reads below start from working models.
    np.testing.assert_allclose(tflite_export.run_tflite(built["tflite"], IMAGES), reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(onnx_export.run_onnx(built["onnx"], IMAGES), reference, rtol=1e-5, atol=1e-5)
    return built


def _write_export(directory, models, damaged=None):
    """An export directory with both files and an export.json recording their intact sizes and SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {"files": {}}
    for kind, data in models.items():
        record["files"][KEYS[kind]] = {"name": NAMES[kind], "bytes": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest()}
        content = damaged[1] if damaged and damaged[0] == kind else data
        (directory / NAMES[kind]).write_bytes(content)
    (directory / "export.json").write_text(json.dumps(record))
    return directory


def _damage(data, rnd):
    """(how, damaged bytes) different from `data`."""
    how = rnd.choice(["truncate", "flip", "zero_range", "random", "append", "header"])
    out = bytearray(data)
    if how == "truncate":
        out = out[:rnd.randrange(len(out))]
    elif how == "flip":
        for _ in range(rnd.randint(1, 4)):
            index = rnd.randrange(len(out))
            out[index] ^= 1 << rnd.randrange(8)
    elif how == "zero_range":
        start = rnd.randrange(len(out))
        out[start:start + rnd.randint(1, 16)] = bytes(len(out[start:start + 16]))
    elif how == "random":
        out = bytearray(rnd.getrandbits(8) for _ in range(rnd.randint(0, 64)))
    elif how == "append":
        out += bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 8)))
    else:
        out[:8] = bytes(rnd.getrandbits(8) for _ in range(8))
    if bytes(out) == data:
        out = out[:-1]
    return how, bytes(out)


def _run_path(kind, path):
    if kind == "tflite":
        return tflite_export.run_tflite(path, IMAGES)
    return onnx_export.run_onnx(path, IMAGES)


def _assert_one_line(exc, path):
    message = str(exc)
    assert "\n" not in message and str(path) in message and "expected" in message, message


@pytest.mark.parametrize("kind", ["tflite", "onnx"])
def test_fuzzed_model_files_are_refused_or_compute_their_own_weights(kind, models, tmp_path):
    rnd = random.Random(30 + len(kind))
    refused_by_path, loaded = {}, 0
    for case in range(CASES):
        how, damaged = _damage(models[kind], rnd)
        export_dir = _write_export(tmp_path / ("case%d" % case), models, (kind, damaged))
        path = export_dir / NAMES[kind]
        # Read back from an export: every change is caught (size, digest, or format), naming the file.
        with pytest.raises(model_files.ModelFileError) as caught:
            model_files.load_export(export_dir)
        _assert_one_line(caught.value, path)
        # Given by path with no record: refused in one line, or (a flipped weight leaves a valid model) run as
        # the model the bytes now are: the ONNX weights read from the damaged file give its logits exactly.
        try:
            logits = _run_path(kind, path)
        except model_files.ModelFileError as exc:
            _assert_one_line(exc, path)
            refused_by_path[how] = refused_by_path.get(how, 0) + 1
            continue
        except tflite_export.TfliteRunError as exc:
            assert "\n" not in str(exc)
            refused_by_path[how] = refused_by_path.get(how, 0) + 1
            continue
        loaded += 1
        assert logits.shape == (len(IMAGES), 3), (how, logits.shape)
        if kind == "onnx":
            from onnx import numpy_helper
            proto = model_files.check_onnx_bytes(damaged, "damaged")
            arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
            if arrays["w"].shape == (8, 3) and arrays["b"].shape == (3,):
                with np.errstate(all="ignore"):
                    expected = IMAGES @ arrays["w"].astype(np.float32) + arrays["b"].astype(np.float32)
                np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4, equal_nan=True)
    print("\n%s: %d damaged files; by path %d refused %s, %d still a loadable model" % (
        kind, CASES, sum(refused_by_path.values()), refused_by_path, loaded))
    assert sum(refused_by_path.values()) >= CASES // 2  # the structural checks do refuse most damage


@pytest.mark.parametrize("kind", ["tflite", "onnx"])
def test_targeted_damage_is_one_line_naming_the_file(kind, models, tmp_path, monkeypatch):
    what = model_files.KINDS[kind]
    other = models["onnx" if kind == "tflite" else "tflite"]
    path = tmp_path / NAMES[kind]

    def refused(message_part):
        for read in (lambda: model_files.read_model_file(path), lambda: _run_path(kind, path)):
            with pytest.raises(model_files.ModelFileError) as caught:
                read()
            _assert_one_line(caught.value, path)
            assert message_part in str(caught.value), str(caught.value)

    path.write_bytes(b"")
    refused("%s %s is empty (0 bytes); expected a .%s file" % (what, path, kind))
    path.write_bytes(other)
    refused("is not a%s %s model" % ("n" if kind == "onnx" else "", "ONNX" if kind == "onnx" else "TFLite"))
    path.write_bytes(models[kind][:7])
    refused("expected")
    path.unlink()
    refused("%s %s cannot be read (No such file or directory); expected an existing regular file" % (what, path))
    path.mkdir()
    refused("%s %s is a directory; expected a regular file" % (what, path))
    path.rmdir()
    os.mkfifo(path)
    refused("%s %s is a FIFO; expected a regular file" % (what, path))  # and never blocks on it
    path.unlink()
    path.write_bytes(models[kind])
    real_open = os.open

    def unreadable(name, flags, *args):
        if os.fspath(name) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(name, flags, *args)
    monkeypatch.setattr(os, "open", unreadable)  # this test may run as root, whom chmod 000 does not stop
    refused("%s %s cannot be opened (Permission denied); expected a readable regular file" % (what, path))


def test_export_record_damage(models, tmp_path):
    export_dir = _write_export(tmp_path / "export", models)
    loaded = model_files.load_export(export_dir)
    assert loaded == {"tflite_float": (str(export_dir / NAMES["tflite"]), models["tflite"]),
                      "onnx": (str(export_dir / NAMES["onnx"]), models["onnx"])}
    record = export_dir / "export.json"
    for text, part in (("", "not valid JSON"), ("[]", "has no 'files' table"),
                       ('{"files": {"onnx": {"name": "../model.onnx"}}}', "file entry 'onnx' is not valid")):
        record.write_text(text)
        with pytest.raises(model_files.ModelFileError, match=part):
            model_files.load_export(export_dir)
    record.unlink()
    with pytest.raises(model_files.ModelFileError, match="export record .*export.json cannot be read"):
        model_files.load_export(export_dir)


def test_model_file_error_is_a_user_error():
    from tfquant.errors import TfquantError
    assert issubclass(model_files.ModelFileError, TfquantError)
    assert files.SMALL_FILE_LIMIT < model_files.MODEL_FILE_LIMIT


def test_export_command_check_reads_back_or_refuses_in_one_line(models, tmp_path, capsys):
    from tfquant.export import __main__ as cli
    labels = np.argmax(IMAGES @ WEIGHTS + BIAS, axis=1)
    labels[:2] = (labels[:2] + 1) % 3  # two of five wrong: accuracy 0.6 for both intact files
    npz = tmp_path / "test.npz"
    np.savez(npz, x_test=IMAGES, y_test=labels)
    intact = _write_export(tmp_path / "intact", models)
    assert cli.main(["--check", str(intact), "--eval_npz", str(npz)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["%s: %d bytes, SHA-256 %s as recorded, accuracy 0.6000 on 5 test images"
                   % (intact / NAMES[kind], len(models[kind]), hashlib.sha256(models[kind]).hexdigest())
                   for kind in ("onnx", "tflite")]
    rnd = random.Random(7)
    for case in range(12):
        kind = ("tflite", "onnx")[case % 2]
        how, damaged = _damage(models[kind], rnd)
        export_dir = _write_export(tmp_path / ("cli%d" % case), models, (kind, damaged))
        assert cli.main(["--check", str(export_dir), "--eval_npz", str(npz)]) == 2, how
        captured = capsys.readouterr()
        assert captured.out == ""  # no accuracy of any file, the intact one included
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(export_dir / NAMES[kind]) in lines[0], (
            how, captured.err)
    with pytest.raises(SystemExit):
        cli.main(["--check", str(intact), "--onnx"])
    assert capsys.readouterr().err == ("error: --onnx is not valid with --check; expected --check alone, or with "
                                       "--eval_npz / --eval_subset\n")
