"""Reading exported model files back (.tflite, .onnx): from a previous export, or any file a user hands in.

A damaged file must never be run and reported as a model: every reader here checks, before any runtime sees the
bytes, that the path is a regular file of bounded size, that it is not empty, that it is the format asked for
(the TFLite flatbuffer identifier, an ONNX protobuf that onnx's checker accepts), and, when the export that wrote
it recorded its size and SHA-256 in export.json, that the bytes are those. A bit flip inside a weight leaves a
file any runtime loads and runs; only the recorded digest tells it from the exported one. Failures raise
ModelFileError with one line naming the file and what was expected.
"""
import hashlib
import os

from tfquant import files
from tfquant.errors import TfquantError

MODEL_FILE_LIMIT = 2 * 1024 ** 3  # protobuf's own ceiling; a TFLite flatbuffer beyond it needs offsets we never write
TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier of the TFLite schema, at bytes 4..8
KINDS = {"tflite": "TFLite model", "onnx": "ONNX model"}
EXPORT_RECORD = "export.json"


class ModelFileError(TfquantError):
    """A model file that cannot be read, is not of its format, or differs from what its export recorded."""


def kind_of(path):
    """'tflite' or 'onnx' from a file name's extension (None for other files)."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    return {".tflite": "tflite", ".onnx": "onnx"}.get(extension)


def digest(data):
    """The SHA-256 of bytes, in hex (what export.json records of every file)."""
    return hashlib.sha256(data).hexdigest()


def _check_record(path, data, what, expected):
    size, sha = expected.get("bytes"), expected.get("sha256")
    if size is not None and len(data) != size:
        raise ModelFileError("%s %s has %d bytes, not the %d its %s records; expected the file as exported "
                             "(export again)" % (what, path, len(data), size, EXPORT_RECORD))
    if sha is not None and digest(data) != sha:
        raise ModelFileError("%s %s does not have the SHA-256 its %s records (its bytes changed since the export); "
                             "expected the file as exported (export again)" % (what, path, EXPORT_RECORD))


def check_tflite_bytes(data, where):
    """Refuse bytes that are not a TFLite flatbuffer by their header (the runtime's verifier checks the rest)."""
    if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
        raise ModelFileError("%s is not a TFLite model (no %r identifier at byte 4); expected a .tflite flatbuffer"
                             % (where, TFLITE_IDENTIFIER.decode()))


def check_onnx_bytes(data, where):
    """Parse bytes as an ONNX model and run onnx's checker; returns the ModelProto."""
    import onnx  # pylint: disable=import-outside-toplevel
    from google.protobuf.message import DecodeError  # pylint: disable=import-outside-toplevel
    try:
        proto = onnx.load_from_string(bytes(data))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelFileError("%s is not an ONNX model (%s); expected an .onnx protobuf"
                             % (where, one_line(exc))) from None
    if not proto.graph.node or not proto.graph.output:
        raise ModelFileError("%s holds no ONNX graph (no nodes or no outputs); expected an .onnx model" % where)
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise ModelFileError("%s is not a valid ONNX model (%s); expected an .onnx model as exported"
                             % (where, one_line(exc))) from None
    return proto


def read_model_file(path, kind=None, expected=None):
    """The bytes of a .tflite or .onnx file, checked as far as they can be without running them.

    Args:
      path: the file.
      kind: 'tflite' or 'onnx' (default: from the extension).
      expected: optional {'bytes': size, 'sha256': hex} the export recorded for it.
    Returns:
      the file's bytes.
    Raises:
      ModelFileError: one line naming the file and what was expected.
    """
    path = os.fspath(path)
    kind = kind or kind_of(path)
    if kind not in KINDS:
        raise ModelFileError("%s is not a model file; expected a .tflite or .onnx file" % path)
    what = KINDS[kind]
    data = files.read_bounded(path, ModelFileError, what, MODEL_FILE_LIMIT)
    if not data:
        raise ModelFileError("%s %s is empty (0 bytes); expected a %s file" % (what, path, "." + kind))
    if expected:
        _check_record(path, data, what, expected)
    where = "%s %s" % (what, path)
    if kind == "tflite":
        check_tflite_bytes(data, where)
    else:
        check_onnx_bytes(data, where)
    return data


def load_export(directory):
    """Every model file of an export directory, checked against the sizes and digests its export.json records.

    Args:
      directory: an output directory of run_directory.export_run_directory.
    Returns:
      {file key of export.json ('tflite_int8', 'onnx', ...): (path, bytes)}.
    Raises:
      ModelFileError: export.json or a model file is missing, damaged or changed since the export.
    """
    directory = os.fspath(directory)
    record = files.load_json_file(os.path.join(directory, EXPORT_RECORD), ModelFileError, "export record")
    entries = record.get("files") if isinstance(record, dict) else None
    if not isinstance(entries, dict):
        raise ModelFileError("export record %s has no 'files' table; expected the export.json of an export"
                             % os.path.join(directory, EXPORT_RECORD))
    models = {}
    for key, entry in sorted(entries.items()):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or os.path.basename(name) != name or not name:
            raise ModelFileError("export record %s: file entry %r is not valid; expected {'name': file name, "
                                 "'bytes': size, 'sha256': digest}" % (os.path.join(directory, EXPORT_RECORD), key))
        if kind_of(name) is None:
            continue
        path = os.path.join(directory, name)
        models[key] = (path, read_model_file(path, expected=entry))
    return models


def one_line(exc):
    """A runtime's error message on one line (its first 300 characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
