"""Model files of any TensorFlow flavour turned into one thing: a frozen inference GraphDef plus what to save back.

Formats (detect_format names them): a tf_keras file or SavedModel ('tf_keras', handled by nets.keras_model,
which rebuilds the Keras network itself), a Keras 3 file ('keras3'), any other SavedModel directory
('saved_model') and a frozen GraphDef ('frozen_graph'). Each loader returns a FileGraph; graph_import turns
it into a trainable network inside a learner's graph.
"""
import dataclasses
import os
import zipfile
from typing import Any, Dict, List, Optional

from nets.errors import DataError

FORMATS = ("tf_keras", "keras3", "saved_model", "frozen_graph")
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


class ModelFileError(DataError):
    """A model file that cannot be used; the message is one line naming the path and what to do."""


@dataclasses.dataclass
class FileGraph:
    """A model file as a frozen inference graph.

    graph_def: the forward pass with every weight a Const; input_name / output_name: its tensors ('x:0');
    input_shape: [None, ...]; variables: {Const node name: (variable name, trainable)} for the Consts that were
    variables in the file (None for a frozen graph, whose variables are found by where they feed);
    save_info: what saving back in the same format needs (format-specific).
    """

    path: str
    kind: str
    graph_def: Any
    input_name: str
    output_name: str
    input_shape: List[Optional[int]]
    variables: Optional[Dict[str, tuple]] = None
    save_info: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _keras_version_of_zip(path):
    """The keras_version a .keras archive's metadata.json records, '' when it has none."""
    import json  # pylint: disable=import-outside-toplevel
    try:
        with zipfile.ZipFile(path) as archive:
            if "metadata.json" not in archive.namelist():
                return ""
            with archive.open("metadata.json") as handle:
                return str(json.loads(handle.read(1 << 20).decode("utf-8", "replace")).get("keras_version", ""))
    except (zipfile.BadZipFile, ValueError, OSError, AttributeError):
        return ""


def _keras_version_of_h5(path):
    """The keras_version attribute of an HDF5 model file, '' when it has none or is no HDF5 file."""
    try:
        import h5py  # pylint: disable=import-outside-toplevel
        with h5py.File(path, "r") as handle:
            version = handle.attrs.get("keras_version", "")
    except (OSError, ImportError, ValueError):
        return ""
    return version.decode("utf-8", "replace") if isinstance(version, bytes) else str(version)


def detect_format(path):
    """The format of a model file or directory, one of FORMATS.

    Raises:
      ModelFileError when the path is missing or of no known format.
    """
    path = os.fspath(path)
    fail = ModelFileError.for_path(path)
    if not os.path.lexists(path):
        raise fail("model %s does not exist; expected a .keras/.h5 file, a SavedModel directory or a frozen "
                   "graph .pb" % path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise fail("model %s is a directory without saved_model.pb; expected a SavedModel directory" % path)
        return "tf_keras" if os.path.isfile(os.path.join(path, "keras_metadata.pb")) else "saved_model"
    if not os.path.isfile(path):
        raise fail("model %s is not a regular file; expected a .keras/.h5 file, a SavedModel directory or a "
                   "frozen graph .pb" % path)
    if path.endswith(".keras"):
        version = _keras_version_of_zip(path)
        if not version:
            raise fail("model %s is not a Keras archive (no metadata.json with keras_version); expected a file "
                       "written by model.save('...keras')" % path)
        return "tf_keras" if version.startswith("2.") else "keras3"
    if path.endswith((".h5", ".hdf5")):
        version = _keras_version_of_h5(path)
        if not version:
            raise fail("model %s is not a Keras HDF5 model (no keras_version attribute); expected a file "
                       "written by model.save('...h5')" % path)
        return "tf_keras" if version.startswith("2.") else "keras3"
    if path.endswith(".pb"):
        return "frozen_graph"
    raise fail("model %s has no known format (suffix %r); expected a .keras/.h5 file, a SavedModel directory or "
               "a frozen graph .pb" % (path, os.path.splitext(path)[1]))


def load_file_graph(path, kind, signature="serving_default", input_name=None, output_name=None):
    """Load a model file of `kind` (not 'tf_keras') as a FileGraph.

    Args:
      path: the file or directory.
      kind: detect_format's answer.
      signature: the SavedModel signature to use.
      input_name / output_name: which input and output, where the model has several (a signature's keys,
        or tensor/op names of a frozen graph).
    Raises:
      ModelFileError naming the path.
    """
    # Imported here: each loader pulls in the parts of TensorFlow or Keras its format needs.
    if kind == "keras3":
        from nets.model_formats import keras3  # pylint: disable=import-outside-toplevel
        return keras3.load(path)
    if kind == "saved_model":
        from nets.model_formats import saved_model  # pylint: disable=import-outside-toplevel
        return saved_model.load(path, signature, input_name, output_name)
    if kind == "frozen_graph":
        from nets.model_formats import frozen_graph  # pylint: disable=import-outside-toplevel
        return frozen_graph.load(path, input_name, output_name)
    raise ValueError("format %r has no graph loader" % kind)
