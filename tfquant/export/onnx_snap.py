"""Put each activation onto the trained graph's grid point before its QuantizeLinear, with the trained arithmetic.

The trained graph (ops.quantize_zero_exact, as TensorFlow's FakeQuant kernel) gives an activation x the code
floor((x - low) * float32(1 / step) + 0.5), low = -zero point * step; QuantizeLinear gives it
round_half_even(x / step) + zero point. The two differ where x sits within an ulp of a rounding boundary, and on
exact ties (ResNet-20 W4A8, 2,000 test images: up to 183 codes a layer applied to the same inputs, each moving
the tensors after it). Before each activation QuantizeLinear, float ops compute the trained code and its value
code * step + low:

    x -> [Sub low] -> Mul float32(1 / step) -> Add 0.5 -> Floor -> Mul step -> [Add low] -> QuantizeLinear -> ...

(low = -0.0 when the zero point is 0: the Sub and the Add change no value then and are left out). That value is
within a few ulps of a grid point, so QuantizeLinear gives it exactly the trained code (values outside the range
saturate as the trained graph's clip does), and the pair keeps its scale and zero point for any runtime reading
it as int8. The ops are elementwise float32 ops, which onnxruntime computes as written (IEEE float32, each
rounded once; no multiply-add fusion on CPU). The cost: onnxruntime no longer fuses the pairs around a residual Add
or a global average pool into its integer QLinearAdd / QLinearGlobalAveragePool, whose requantization rounds
otherwise than the trained graph; those run in float32 as trained.
"""
import numpy as np


def _onnx():
    import onnx  # pylint: disable=import-outside-toplevel
    return onnx


def snap_activations(model):
    """Insert the trained rounding before every QuantizeLinear of a computed tensor (in place).

    Args:
      model: an onnx ModelProto whose activation QuantizeLinear nodes have scalar float32 scales and uint8 or
        int8 zero points as initializers (tf2onnx's conversion of FakeQuant ops).
    Returns:
      the number of QuantizeLinear nodes given the trained rounding.
    """
    onnx = _onnx()
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    nodes, snapped = [], 0
    for node in graph.node:
        chain = _trained_rounding(node, constants, onnx, numpy_helper, graph.initializer)
        if chain:
            nodes.extend(chain)
            node.input[0] = chain[-1].output[0]
            snapped += 1
        nodes.append(node)
    # One rebuild of the node list (inserting in place would search the list for every quantizer); copies, since
    # clearing the repeated field may invalidate the messages it held.
    rebuilt = []
    for node in nodes:
        rebuilt.append(onnx.NodeProto())
        rebuilt[-1].CopyFrom(node)
    del graph.node[:]
    graph.node.extend(rebuilt)
    return snapped


def _trained_rounding(node, constants, onnx, numpy_helper, initializers):
    """The nodes computing the trained code's value before an activation QuantizeLinear (their constants added to
    initializers), or [] for any other node."""
    if node.op_type != "QuantizeLinear" or node.input[0] in constants or len(node.input) < 3:
        return []
    scale_proto, zero_proto = constants.get(node.input[1]), constants.get(node.input[2])
    if scale_proto is None or zero_proto is None:
        return []
    scale, zero = numpy_helper.to_array(scale_proto), numpy_helper.to_array(zero_proto)
    if scale.size != 1 or zero.size != 1 or scale.dtype != np.float32:
        return []
    step = np.float32(scale.reshape(()))
    zero = int(zero.reshape(()))
    base = node.name + "_trained_rounding"
    # The trained graph's float32 constants: 1 / step, and low = -zero point * step.
    values = {"_inverse": np.divide(np.float32(1.0), step, dtype=np.float32), "_half": np.float32(0.5),
              "_step": step}
    chain = [("Mul", "_inverse"), ("Add", "_half"), ("Floor", None), ("Mul", "_step")]
    if zero:
        values["_low"] = np.multiply(np.float32(-zero), step, dtype=np.float32)
        chain = [("Sub", "_low")] + chain + [("Add", "_low")]
    for suffix, value in values.items():
        initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), base + suffix))
    made, current = [], node.input[0]
    for number, (op, operand) in enumerate(chain):
        output = "%s_%d" % (base, number)
        made.append(onnx.helper.make_node(op, [current] + ([base + operand] if operand else []), [output],
                                          name=output))
        current = output
    return made
