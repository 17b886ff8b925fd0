"""The inference graph a quantized run saves beside its checkpoint, so export needs no model code.

The file is a MetaGraphDef of the model's evaluation forward pass *before* quantization: a float32
placeholder named INPUT_NAME with the model's input shape, the forward pass with its variables, and an
Identity named OUTPUT_NAME on the logits. Quantization is not stored in it because the report already
records every decision: export replays them with `tfquant.quantize_graph(config_from_report(report))`
(the quantized evaluation graph, for the checkpoint's own accuracy) or replaces the weights by their
packed, dequantized values and quantizes activations only (the frozen graph). Storing the rewritten
graph instead would make the frozen graph quantize already-quantized weights a second time.
"""
import os

import numpy as np
import tensorflow as tf
from google.protobuf import message as protobuf_message

from tfquant import files
from tfquant.errors import TfquantError

tf1 = tf.compat.v1

INFERENCE_GRAPH_NAME = "inference_graph.meta"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# A ResNet-110 forward pass serialises to well under 1 MiB; the limit only stops a wrong file early.
INFERENCE_GRAPH_LIMIT = 64 * 1024 * 1024


class InferenceGraphError(TfquantError, ValueError):
    """The saved inference graph is missing, unreadable or lacks its named input or output."""


def _without_stored_initial_values(next_creator, **kwargs):
    """Variable creator that keeps an array initial value (e.g. a Keras file's weights) out of the graph.

    Every user of the saved graph restores or assigns the variables from a checkpoint or the packed file, so a
    weight stored as a constant initial value would only make the file as large as the model.
    """
    initial = kwargs.get("initial_value")
    if initial is not None and not callable(initial) and not isinstance(initial, (tf.Tensor, tf.Variable)):
        value = np.asarray(initial)
        kwargs["initial_value"] = tf.zeros(value.shape, tf.as_dtype(value.dtype))
    return next_creator(**kwargs)


def inference_meta_graph(build_forward, input_shape):
    """The serialised MetaGraphDef of `build_forward` on a placeholder named INPUT_NAME.

    Args:
      build_forward: images -> logits; builds the evaluation forward pass (creating its variables with
        tf.compat.v1.get_variable) in the current graph.
      input_shape: [None, H, W, C] (any rank; the first dimension is the batch).
    Returns:
      bytes of a MetaGraphDef whose graph has INPUT_NAME and OUTPUT_NAME.
    """
    graph = tf.Graph()
    with graph.as_default(), tf.variable_creator_scope(_without_stored_initial_values):
        images = tf1.placeholder(tf.float32, list(input_shape), name=INPUT_NAME)
        logits = build_forward(images)
        with graph.name_scope(None):
            output = tf.identity(logits, name=OUTPUT_NAME)
        if output.op.name != OUTPUT_NAME or images.op.name != INPUT_NAME:
            raise InferenceGraphError("the forward pass already defines an op named %r or %r; expected these "
                                      "names free for the inference graph's input and output"
                                      % (INPUT_NAME, OUTPUT_NAME))
        meta_graph = tf1.train.export_meta_graph(graph=graph, clear_devices=True)
    return meta_graph.SerializeToString()


def save_inference_graph(directory, build_forward, input_shape):
    """Write INFERENCE_GRAPH_NAME into `directory` atomically; returns its path (see inference_meta_graph)."""
    path = os.path.join(directory, INFERENCE_GRAPH_NAME)
    files.write_atomically(path, inference_meta_graph(build_forward, input_shape))
    return path


def _tensor_shape(meta_graph, path):
    """[None or int, ...] of INPUT_NAME's placeholder in the MetaGraphDef's graph."""
    for node in meta_graph.graph_def.node:
        if node.name == INPUT_NAME:
            if node.op != "Placeholder":
                break
            dims = node.attr["shape"].shape
            if dims.unknown_rank:
                break
            return [None if d.size < 0 else int(d.size) for d in dims.dim]
    raise InferenceGraphError("inference graph %s has no placeholder %r with a known rank; expected the file "
                              "written by a quantized run" % (path, INPUT_NAME))


class InferenceGraph:
    """A saved inference graph: its input shape and a builder of its forward pass in the current graph."""

    def __init__(self, path):
        """Read and check `path` (a regular file below INFERENCE_GRAPH_LIMIT holding a MetaGraphDef)."""
        data = files.read_bounded(path, InferenceGraphError, "inference graph", INFERENCE_GRAPH_LIMIT)
        meta_graph = tf1.MetaGraphDef()
        try:
            meta_graph.ParseFromString(data)
        except (protobuf_message.DecodeError, ValueError) as exc:
            raise InferenceGraphError("inference graph %s cannot be parsed (%s); expected a MetaGraphDef"
                                      % (path, " ".join(str(exc).split()) or type(exc).__name__)) from None
        names = {node.name for node in meta_graph.graph_def.node}
        if OUTPUT_NAME not in names:
            raise InferenceGraphError("inference graph %s has no op %r; expected the file written by a quantized "
                                      "run" % (path, OUTPUT_NAME))
        self.path = path
        self.input_shape = _tensor_shape(meta_graph, path)
        self._meta_graph = meta_graph

    def build_forward(self, images):
        """Import the forward pass into the current graph reading `images`; returns its logits tensor.

        The variables keep their names (they match the checkpoint); the saved placeholder is replaced by
        `images`, so the imported copy of it is left unused.
        """
        try:
            tf1.train.import_meta_graph(self._meta_graph, input_map={INPUT_NAME + ":0": images},
                                        clear_devices=True)
        except (ValueError, TypeError, KeyError, tf.errors.OpError) as exc:
            raise InferenceGraphError("inference graph %s cannot be imported (%s)"
                                      % (self.path, " ".join(str(exc).split()) or type(exc).__name__)) from None
        return tf1.get_default_graph().get_tensor_by_name(OUTPUT_NAME + ":0")
