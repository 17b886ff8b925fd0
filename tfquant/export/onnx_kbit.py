"""k-bit weights in an ONNX model: the trained codes as INT4/UINT4/INT2/UINT2 initializers + DequantizeLinear.

tf2onnx refuses FakeQuant ops of fewer than 8 bits, so the model is converted with each k-bit weight as the
float value it dequantizes to (the packed file's, bit for bit), and every initializer equal to one of them
(up to the transpose tf2onnx gives a convolution's kernel) is replaced here by

    codes (UINTk, raw-packed: ceil(n * k / 8) bytes) -> DequantizeLinear(scale, zero point) [-> Add offset]
    [-> Reshape / Transpose to the consumer's layout]

with codes equal to the checkpoint's (tfquant.export.packed_file.QuantizedTensor: value = codes * (alpha *
float32(1 / (2^k - 1))) + beta per range group). The range groups become DequantizeLinear's own forms where
they fit the consumer's tensor: 'per_tensor', 'per_axis' (channel buckets) or 'blocked' (block_size: split or
block buckets contiguous along one axis; a MatMul weight [K, N] blocked along K is what onnxruntime fuses into
MatMulNBits). Any other layout is 'reshaped': the codes are stored in the layout's own matrix view, blocked
or per axis there, and a Reshape/Transpose after the DequantizeLinear gives the consumer its tensor; the codes
are never changed (where a float offset needs whole blocks, a short last block is padded with copies of its
last row, which a Slice drops again and read_weight_codes ignores). A grid whose offset beta is an integer
number of steps (symmetric, LSQ) has an integer zero point where DequantizeLinear's (code - zero point) * scale
gives the trained values bit for bit, or where onnxruntime's MatMulNBits takes the weight; any other keeps zero
point 0 and adds beta after the DequantizeLinear, exact but not fusable ('float_offset': PocketFlow's min/max
grid, and most symmetric grids, whose code * scale + beta is an ulp off (code - zero point) * scale for about
half the codes). 3-bit codes are stored in UINT4, 1-bit in UINT2. The stored types are unsigned because the trained codes are (0 .. 2^k - 1).
"""
import dataclasses
import itertools
import json
from typing import Optional

import numpy as np

from tfquant.export import onnx_fusion, packing

# Key of the model's metadata_props entry that says, per weight, how its codes are stored (read_weight_codes).
METADATA_KEY = "tfquant_kbit_weights"
MAX_KBIT_BITS = 4
# The container each width is stored in (ONNX has 2-, 4- and 8-bit integer tensors).
CONTAINER_BITS = {1: 2, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
ONNX_TYPE_NAMES = {2: "UINT2", 4: "UINT4", 8: "UINT8"}


@dataclasses.dataclass
class WeightPlan:
    """How one weight's codes are stored: the stored codes (unsigned), the DequantizeLinear's parameters and
    the ops after it. `order`/`stored_shape`: stored = codes.transpose(order).reshape(stored_shape);
    `post`: [('Reshape', shape) | ('Transpose', perm)] from the DequantizeLinear's output to the consumer's."""

    name: str
    variable: str
    bits: int
    container_bits: int
    form: str
    codes: np.ndarray
    order: tuple
    scale: np.ndarray
    zero_point: Optional[np.ndarray]
    offset: Optional[np.ndarray]
    axis: Optional[int]
    block_size: Optional[int]
    post: list
    layout: str
    as_trained: bool = True

    def record(self):
        """JSON-able description for export.json."""
        return {"variable": self.variable, "initializer": self.name, "bits": self.bits,
                "stored_type": ONNX_TYPE_NAMES[self.container_bits], "layout": self.layout, "form": self.form,
                "axis": self.axis, "block_size": self.block_size,
                "zero_point": "integer" if self.zero_point is not None else "float_offset (cannot fuse)",
                # Whether the file's DequantizeLinear (+ offset) computes the trained values bit for bit.
                "dequantizes_as_trained": bool(self.as_trained),
                "code_bytes": packing.packed_size(self.codes.size, self.container_bits)}


def _onnx():
    import onnx  # pylint: disable=import-outside-toplevel
    return onnx


def group_scales(tensor):
    """(scale per group as float32 alpha * float32(1/(2^k-1)), integer zero point per group or None) of a
    QuantizedTensor: the zero point exists when every beta equals -zero_point * scale in float32."""
    scale = np.multiply(tensor.alpha, np.float32(1.0 / ((1 << tensor.bits) - 1)), dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.round(-tensor.beta.astype(np.float64) / scale.astype(np.float64))
    ok = (np.all(np.isfinite(zero)) and np.all(zero >= 0) and np.all(zero <= (1 << tensor.bits) - 1)
          and np.array_equal(np.multiply(-zero.astype(np.float32), scale, dtype=np.float32), tensor.beta))
    return scale, (zero.astype(np.int64) if ok else None)


def _direct_form(groups, bucket_size):
    """('per_tensor' | 'per_axis' | 'blocked', axis, block size, group of each scale entry) when the group
    index array `groups` (in the consumer's shape) is one of DequantizeLinear's forms, else None."""
    if groups.max(initial=0) == 0:
        return "per_tensor", None, None, np.zeros((), np.int64)
    shape = groups.shape
    for axis in range(groups.ndim):
        along = groups[tuple(slice(None) if a == axis else 0 for a in range(groups.ndim))]
        view = [1] * groups.ndim
        view[axis] = shape[axis]
        # One scale per coordinate of the axis, each a group of its own (not one per element of a 1-D view).
        if np.unique(along).size == along.size and np.array_equal(np.broadcast_to(along.reshape(view), shape),
                                                                   groups):
            return "per_axis", axis, None, along
    for axis in range(groups.ndim) if bucket_size else ():
        starts = groups.take(np.arange(0, shape[axis], bucket_size), axis=axis)
        expanded = np.repeat(starts, bucket_size, axis=axis).take(np.arange(shape[axis]), axis=axis)
        if np.array_equal(expanded, groups):
            return "blocked", axis, bucket_size, starts
    return None


def _offset_fits(form, axis, block, shape):
    """Whether a float offset of one value per scale entry broadcasts over the dequantized tensor."""
    return form != "blocked" or shape[axis] == block


def _layout_view(tensor, whole_blocks):
    """(axis order, matrix shape, stored shape) of a layout's own matrix view, in which its groups are a
    DequantizeLinear form whatever the consumer's layout; with `whole_blocks`, blocks are an axis of their own
    (the matrix's rows padded to whole blocks) so that one value per block broadcasts."""
    shape = tensor.shape
    if tensor.layout == "channel":
        axes = list(tensor.channel_axes)
        order = tuple(axes + [a for a in range(len(shape)) if a not in axes])
        channels = int(np.prod([shape[a] for a in axes]))
        matrix = (channels, tensor.size // max(channels, 1))
        return order, matrix, matrix
    if tensor.layout in ("split", "block"):
        if tensor.layout == "split":
            order, rows, columns = tuple(range(len(shape))), tensor.size, None
        else:
            layout = packing._layout_of(shape, "block", tensor.channel_axes, tensor.bucket_size)
            order, rows, columns = layout.block_matrix(shape)
        rest = () if columns is None else (columns,)
        block = tensor.bucket_size
        if whole_blocks:
            return tuple(order), (rows,) + rest, (-(-rows // block), block) + rest
        return tuple(order), (rows,) + rest, (rows,) + rest
    return tuple(range(len(shape))), (tensor.size,), (tensor.size,)


def _padded(array, matrix, stored):
    """`array` (in the view's axis order) as the matrix, its rows padded with copies of the last row to the
    stored view's whole blocks: the padding is dropped again by a Slice after the DequantizeLinear."""
    array = array.reshape(matrix)
    rows = int(np.prod(stored)) // max(int(np.prod(matrix[1:])), 1)
    if rows > matrix[0]:
        array = np.concatenate([array, np.repeat(array[-1:], rows - matrix[0], axis=0)])
    return array.reshape(stored)


def _groups_in(tensor, order, shape):
    """The group index of every element of the tensor transposed by `order` and reshaped to `shape`."""
    index = packing.group_index(tensor.shape, tensor.layout, tensor.channel_axes, tensor.bucket_size)
    return index.reshape(tensor.shape).transpose(order).reshape(shape)


def plan_weight(name, variable, tensor, order, consumer_shape, container_bits=None, fusable=True):
    """The WeightPlan of a QuantizedTensor read by its consumer as tensor.transpose(order).reshape(shape).

    Args:
      name: the initializer's name (the DequantizeLinear's output keeps it).
      variable: the weight variable's name.
      tensor: the packed file's QuantizedTensor.
      order: axis permutation of the tensor the consumer reads.
      consumer_shape: shape of the consumer's initializer.
      container_bits: bits of the stored type (default CONTAINER_BITS[bits]; larger: a fallback).
      fusable: False puts the codes in the layout's own view with a Reshape after the DequantizeLinear, a
        pattern onnxruntime fuses into no integer kernel (the fallback for its sub-byte defects).
    Returns:
      a WeightPlan, or None when the weight cannot be stored exactly (a float offset on ragged blocks).
    """
    scale, zero = group_scales(tensor)
    consumer_shape = tuple(int(d) for d in consumer_shape)
    found = _direct_form(_groups_in(tensor, order, consumer_shape), tensor.bucket_size) if fusable else None
    # DequantizeLinear computes (code - zero point) * scale, the trained graph code * scale + beta: an ulp apart
    # for most of a symmetric grid's values (59 % of ResNet-20's 4-bit weights), which moved activations across
    # rounding boundaries (issue 32). Such a weight gets zero point 0 and beta added, exactly the trained values,
    # unless onnxruntime's MatMulNBits (a [K, N] weight blocked along K) takes it: that kernel dequantizes in its
    # own arithmetic whatever the file says, and needs the integer zero point to fuse.
    matmul_nbits = found is not None and found[0] == "blocked" and found[1] == 0 and len(consumer_shape) == 2
    exact = zero is None or dequantizes_as_trained(tensor, scale, zero)
    if not exact and not matmul_nbits:
        plan = _plan(name, variable, tensor, order, consumer_shape, container_bits, scale, None, found, True)
        if plan is not None:
            return plan
    return _plan(name, variable, tensor, order, consumer_shape, container_bits, scale, zero, found, exact)


def dequantizes_as_trained(tensor, scale, zero):
    """Whether DequantizeLinear's float32 (code - zero point) * scale gives the trained values bit for bit."""
    index = packing.group_index(tensor.shape, tensor.layout, tensor.channel_axes, tensor.bucket_size)
    index = index.reshape(tensor.shape)
    values = np.multiply((tensor.codes.astype(np.int64) - zero[index]).astype(np.float32), scale[index],
                         dtype=np.float32)
    return np.array_equal(values, tensor.dequantize())


def _plan(name, variable, tensor, order, consumer_shape, container_bits, scale, zero, found, as_trained):
    """plan_weight with the scales and zero points (None: zero point 0 and a float offset) decided; as_trained:
    whether they dequantize to the trained values bit for bit."""
    if found is not None and (zero is not None or _offset_fits(found[0], found[1], found[2], consumer_shape)):
        store_order, stored_shape, post, reshaped = tuple(order), consumer_shape, [], False
    else:
        store_order, matrix, stored_shape = _layout_view(tensor, whole_blocks=zero is None)
        groups = _padded(_groups_in(tensor, store_order, matrix), matrix, stored_shape)
        found = _direct_form(groups, tensor.bucket_size)
        if found is None or (zero is None and not _offset_fits(found[0], found[1], found[2], stored_shape)):
            return None
        transposed = [tensor.shape[a] for a in store_order]
        post = []
        if int(np.prod(stored_shape)) != tensor.size:
            post = [("Reshape", [-1] + list(matrix[1:])), ("Slice", matrix[0])]
        if list(stored_shape) != transposed:
            post.append(("Reshape", transposed))
        perm = [store_order.index(a) for a in order]
        if perm != sorted(perm):
            post.append(("Transpose", perm))
        if list(consumer_shape) != [tensor.shape[a] for a in order]:
            post.append(("Reshape", list(consumer_shape)))
        if not post:
            # The layout's own view is the consumer's: an identity Reshape keeps the DequantizeLinear from
            # feeding the consumer directly (the non-fusing form).
            post = [("Reshape", list(consumer_shape))]
        reshaped = True
    form, axis, block, entries = found
    offset = None
    if zero is None:
        offset = tensor.beta[entries]
        if form == "per_axis":
            view = [1] * len(stored_shape)
            view[axis] = -1
            offset = offset.reshape(view)
    return WeightPlan(
        name=name, variable=variable, bits=tensor.bits,
        container_bits=container_bits or CONTAINER_BITS[tensor.bits],
        form=("reshaped/" if reshaped else "") + form,
        as_trained=as_trained,
        codes=(tensor.codes.transpose(store_order).reshape(stored_shape) if not reshaped
               else _padded(tensor.codes.transpose(store_order), matrix, stored_shape)), order=store_order,
        scale=scale[entries], zero_point=None if zero is None else zero[entries], offset=offset, axis=axis,
        block_size=block, post=post, layout=tensor.layout)


def _packed_initializer(name, values, container_bits):
    """An unsigned integer initializer of `container_bits` with raw data packed as ONNX specifies (the first
    element in the lowest bits), which is tfquant's packing order."""
    onnx = _onnx()
    kinds = {2: onnx.TensorProto.UINT2, 4: onnx.TensorProto.UINT4, 8: onnx.TensorProto.UINT8}
    values = np.asarray(values)
    return onnx.helper.make_tensor(name, kinds[container_bits], list(values.shape),
                                   vals=packing.pack_codes(values.reshape(-1), container_bits), raw=True)


def apply_plan(model, plan):
    """Replace the float initializer `plan.name` of `model` (in place) by the plan's codes and ops."""
    onnx = _onnx()
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    graph = model.graph
    old = next(t for t in graph.initializer if t.name == plan.name)
    graph.initializer.remove(old)
    base = plan.name + "_kbit"
    inputs = [base + "_codes", base + "_scale"]
    graph.initializer.append(_packed_initializer(inputs[0], plan.codes, plan.container_bits))
    graph.initializer.append(numpy_helper.from_array(np.asarray(plan.scale, np.float32), inputs[1]))
    zero = plan.zero_point if plan.zero_point is not None else np.zeros(np.shape(plan.scale), np.int64)
    inputs.append(base + "_zero_point")
    graph.initializer.append(_packed_initializer(inputs[2], zero, plan.container_bits))
    attributes = {}
    if plan.axis is not None:
        attributes["axis"] = plan.axis
    if plan.block_size is not None:
        attributes["block_size"] = plan.block_size
    steps = [("DequantizeLinear", None)]
    if plan.offset is not None:
        steps.append(("Add", None))
    steps += plan.post
    nodes, current = [], None
    for number, (op, argument) in enumerate(steps):
        output = plan.name if number == len(steps) - 1 else "%s_%d" % (base, number)
        if op == "DequantizeLinear":
            nodes.append(onnx.helper.make_node(op, inputs, [output], name=base + "_dequantize", **attributes))
        elif op == "Add":
            graph.initializer.append(numpy_helper.from_array(np.asarray(plan.offset, np.float32), base + "_offset"))
            nodes.append(onnx.helper.make_node(op, [current, base + "_offset"], [output], name=base + "_offset_add"))
        elif op == "Slice":
            # Rows [0, argument) of axis 0: the codes of whole blocks without their padding.
            for suffix, value in (("_starts", 0), ("_ends", argument), ("_axes", 0)):
                graph.initializer.append(numpy_helper.from_array(np.asarray([value], np.int64), output + suffix))
            nodes.append(onnx.helper.make_node(op, [current] + [output + s for s in ("_starts", "_ends", "_axes")],
                                               [output], name=output + "_slice"))
        elif op == "Reshape":
            graph.initializer.append(numpy_helper.from_array(np.asarray(argument, np.int64), output + "_shape"))
            nodes.append(onnx.helper.make_node(op, [current, output + "_shape"], [output], name=output + "_reshape"))
        else:
            nodes.append(onnx.helper.make_node(op, [current], [output], perm=list(argument),
                                               name=output + "_transpose"))
        current = output
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return inputs[0]


def find_weight_initializers(model, tensors):
    """{initializer name: (variable, axis order)} of the model's float initializers that hold a quantized
    weight's dequantized value exactly, possibly transposed (a convolution's OIHW kernel) and reshaped.

    Args:
      model: onnx ModelProto.
      tensors: {variable name: QuantizedTensor}.
    """
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    values = {name: tensor.dequantize() for name, tensor in tensors.items()}
    by_size = {}
    for name, value in values.items():
        by_size.setdefault(value.size, []).append(name)
    found = {}
    for initializer in model.graph.initializer:
        if initializer.data_type != 1:  # FLOAT
            continue
        size = int(np.prod(initializer.dims, dtype=np.int64))
        candidates = by_size.get(size, [])
        if not candidates or size < 2:
            continue
        array = numpy_helper.to_array(initializer)
        for name in candidates:
            value = values[name]
            for order in itertools.permutations(range(value.ndim)):
                if np.array_equal(value.transpose(order).reshape(array.shape), array):
                    found[initializer.name] = (name, tuple(order))
                    break
            if initializer.name in found:
                break
    return found


def store_kbit_weights(model, tensors, overrides=None):
    """Store every weight of `tensors` found in `model` (in place) as codes + DequantizeLinear.

    Args:
      model: onnx ModelProto converted from a graph holding the dequantized weights.
      tensors: {variable name: QuantizedTensor} of the weights to store (at most 8 bits).
      overrides: {variable: (container bits or None, fusable)}: the fallbacks of onnx_check.
    Returns:
      {variable: record} (export.json's per-weight description; 'stored_type' 'FLOAT' with a reason when the
      weight could not be stored as codes).
    """
    overrides = overrides or {}
    found = find_weight_initializers(model, tensors)
    records, described = {}, []
    for initializer, (variable, order) in sorted(found.items()):
        tensor = tensors[variable]
        shape = [int(d) for d in next(t.dims for t in model.graph.initializer if t.name == initializer)]
        container, fusable = overrides.get(variable, (None, True))
        plan = plan_weight(initializer, variable, tensor, order, shape, container, fusable)
        if plan is None:
            records[variable] = {"variable": variable, "bits": tensor.bits, "layout": tensor.layout,
                                 "stored_type": "FLOAT", "reason": "ragged blocks with a float offset"}
            continue
        codes_name = apply_plan(model, plan)
        if plan.form == "blocked" and plan.axis == 0 and len(shape) == 2:
            onnx_fusion.keep_matmul_nbits(model, initializer)
        records[variable] = plan.record()
        described.append({"variable": variable, "codes": codes_name, "shape": list(tensor.shape),
                          "order": list(plan.order), "bits": tensor.bits})
    for variable, tensor in tensors.items():
        records.setdefault(variable, {"variable": variable, "bits": tensor.bits, "layout": tensor.layout,
                                      "stored_type": "FLOAT",
                                      "reason": "no initializer of the converted model holds the trained weight"})
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(described)
    return records


def read_weight_codes(model):
    """{variable: unsigned codes in the weight's own shape} read back from a model's k-bit initializers
    (serialized bytes or ModelProto), by the description store_kbit_weights leaves in its metadata."""
    onnx = _onnx()
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    proto = onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else model
    described = next((json.loads(p.value) for p in proto.metadata_props if p.key == METADATA_KEY), [])
    initializers = {t.name: t for t in proto.graph.initializer}
    codes = {}
    for entry in described:
        stored = numpy_helper.to_array(initializers[entry["codes"]]).astype(np.int64)
        order = entry["order"]
        # Codes padded to whole blocks have their padding at the end of the stored order.
        size = int(np.prod(entry["shape"], dtype=np.int64))
        transposed = stored.reshape(-1)[:size].reshape([entry["shape"][a] for a in order])
        codes[entry["variable"]] = transposed.transpose([order.index(a) for a in range(len(order))])
    return codes
