"""Frozen GraphDef files (.pb): the graph is the model; its input and output are named by the user or found."""
import os

import tensorflow as tf
from google.protobuf import message as protobuf_message

from nets.model_formats import FileGraph, ModelFileError
from tfquant import files

# A frozen ResNet-50 is ~100 MB; the limit only stops a wrong file early.
FROZEN_GRAPH_LIMIT = 2 << 30


def _tensor_name(name):
    return name if ":" in name else name + ":0"


def _shape(node):
    shape = node.attr["shape"].shape
    if shape.unknown_rank:
        return None
    return [None if dim.size < 0 else int(dim.size) for dim in shape.dim]


def load(path, input_name=None, output_name=None):
    """A frozen GraphDef as a FileGraph.

    input_name: the input placeholder (default: the graph's only Placeholder); output_name: the output tensor
    (default: the only op no other op reads, other than the placeholders).
    """
    path = os.fspath(path)
    fail = ModelFileError.for_path(path)
    data = files.read_bounded(path, fail, "frozen graph", limit=FROZEN_GRAPH_LIMIT)
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except (protobuf_message.DecodeError, RuntimeError, ValueError):
        raise fail("frozen graph %s is not a GraphDef; expected a .pb written by graph_def.SerializeToString()"
                   % path) from None
    if not graph_def.node:
        raise fail("frozen graph %s holds no ops; expected a GraphDef of the model's forward pass" % path)
    nodes = {node.name: node for node in graph_def.node}
    placeholders = [node.name for node in graph_def.node if node.op == "Placeholder"]
    if input_name is None:
        if len(placeholders) != 1:
            raise fail("frozen graph %s has %d placeholders (%s); expected --input_name naming the image input"
                       % (path, len(placeholders), ", ".join(placeholders[:5])))
        input_name = placeholders[0]
    input_op = input_name.split(":")[0]
    if input_op not in nodes or nodes[input_op].op != "Placeholder":
        raise fail("frozen graph %s has no placeholder %r; expected --input_name naming one of: %s"
                   % (path, input_name, ", ".join(placeholders[:10]) or "(none)"))
    if output_name is None:
        read = {name.lstrip("^").split(":")[0] for node in graph_def.node for name in node.input}
        ends = [node.name for node in graph_def.node
                if node.name not in read and node.op not in ("Placeholder", "NoOp", "Const")]
        if len(ends) != 1:
            raise fail("frozen graph %s has %d ops nothing reads (%s); expected --output_name naming the output"
                       % (path, len(ends), ", ".join(ends[:5])))
        output_name = ends[0]
    if output_name.split(":")[0] not in nodes:
        raise fail("frozen graph %s has no op %r; expected --output_name naming the output tensor"
                   % (path, output_name))
    shape = _shape(nodes[input_op])
    if shape is None or len(shape) < 2:
        raise fail("frozen graph %s: placeholder %r has shape %s; expected images [batch, ...] of known rank"
                   % (path, input_op, shape))
    return FileGraph(path=path, kind="frozen_graph", graph_def=graph_def, input_name=_tensor_name(input_name),
                     output_name=_tensor_name(output_name), input_shape=[None] + shape[1:], variables=None,
                     save_info={"input_op": input_op, "output_name": _tensor_name(output_name)})
