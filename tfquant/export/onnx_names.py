"""Short tensor and node names in an ONNX model: what a k-bit file spends on names, not on weights.

tf2onnx names every tensor after its TensorFlow scope ('model/stage3/block0/shortcut_conv/.../
FakeQuantWithMinMaxVars_DequantizeLinear__155:0'); a tensor's name is written once per reader, so in a 2-bit
ResNet-20 the names take as many bytes as the codes. Every name but the graph's inputs and outputs becomes
't<number>' (tensors) or 'n<number>' (nodes); the model computes the same.
"""
import json


def shorten_names(model, metadata_key=None):
    """Rename the model's tensors and nodes in place.

    Args:
      model: an onnx ModelProto (one graph, no subgraphs).
      metadata_key: a metadata_props entry holding JSON records whose 'codes' fields name initializers;
        they are renamed too.
    Returns:
      {old tensor name: new name}.
    """
    graph = model.graph
    kept = {value.name for value in graph.input} | {value.name for value in graph.output}
    mapping = {}

    def short(name):
        if not name or name in kept:
            return name
        if name not in mapping:
            mapping[name] = "t%d" % len(mapping)
        return mapping[name]

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for number, node in enumerate(graph.node):
        node.name = "n%d" % number
        for index, name in enumerate(node.input):
            node.input[index] = short(name)
        for index, name in enumerate(node.output):
            node.output[index] = short(name)
    for value in graph.value_info:
        value.name = short(value.name)
    for entry in model.metadata_props:
        if entry.key == metadata_key:
            records = json.loads(entry.value)
            for record in records:
                record["codes"] = mapping.get(record["codes"], record["codes"])
            entry.value = json.dumps(records)
    return mapping
