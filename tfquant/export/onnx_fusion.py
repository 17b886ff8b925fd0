"""Graph edits around a k-bit MatMul weight that let onnxruntime fuse it into its MatMulNBits kernel.

onnxruntime fuses DequantizeLinear (blocked along K) -> MatMul into MatMulNBits, but earlier passes take the
pattern first: tf2onnx writes MatMul + bias as Gemm, and onnxruntime's own MatMul + Add + activation fusion
makes a float FusedGemm. Both are rewritten into equivalent ops it leaves alone (MatMul + Add; Max(x, 0) for
the Relu); the results are the same numbers.
"""
import numpy as np


def _onnx():
    import onnx  # pylint: disable=import-outside-toplevel
    return onnx


def keep_matmul_nbits(model, weight):
    """Apply gemm_as_matmul and relu_as_max to the ops reading `weight` (a DequantizeLinear output)."""
    gemm_as_matmul(model, weight)
    relu_as_max(model, weight)


def gemm_as_matmul(model, weight):
    """Split each plain Gemm (no transposes, alpha = beta = 1) reading `weight` as B into MatMul + Add:
    onnxruntime fuses a blocked DequantizeLinear into MatMulNBits only in front of a MatMul."""
    onnx = _onnx()
    graph = model.graph
    for node in list(graph.node):
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] != weight:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("transA", 0) or attributes.get("transB", 0) or attributes.get("alpha", 1.0) != 1.0 \
                or attributes.get("beta", 1.0) != 1.0:
            continue
        position = list(graph.node).index(node)
        graph.node.remove(node)
        product = node.output[0] + "_matmul" if len(node.input) > 2 else node.output[0]
        replacement = [onnx.helper.make_node("MatMul", list(node.input[:2]), [product], name=node.name + "_matmul")]
        if len(node.input) > 2:
            replacement.append(onnx.helper.make_node("Add", [product, node.input[2]], list(node.output),
                                                     name=node.name + "_bias"))
        for offset, new in enumerate(replacement):
            graph.node.insert(position + offset, new)


def relu_as_max(model, weight):
    """Write a Relu after MatMul(., weight) -> Add as Max(x, 0): onnxruntime fuses MatMul + Add + activation into
    its float FusedGemm before it would fuse the blocked k-bit weight into MatMulNBits, and leaves Max alone."""
    onnx = _onnx()
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    graph = model.graph
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for matmul in [n for n in graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] == weight]:
        adds = readers.get(matmul.output[0], [])
        if len(adds) != 1 or adds[0].op_type != "Add":
            continue
        relus = readers.get(adds[0].output[0], [])
        if len(relus) != 1 or relus[0].op_type != "Relu":
            continue
        zero = weight + "_relu_zero"
        if all(t.name != zero for t in graph.initializer):
            graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
        relu = relus[0]
        position = list(graph.node).index(relu)
        graph.node.remove(relu)
        graph.node.insert(position, onnx.helper.make_node("Max", [relu.input[0], zero], list(relu.output),
                                                          name=relu.name + "_as_max"))
