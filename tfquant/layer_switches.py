"""Per-layer on/off switches on the quantizers of a rewritten evaluation graph.

After `quantize_graph`, every quantized weight and activation is a small subgraph (under the name scope
`<op>/weight_quant` or `<tensor>/act_quant`) that reads a float tensor x and yields Q(x), which the layer's
readers read. `insert_switches` finds each (x, Q(x)) pair and makes the readers read
Q(x) or x by `switch`, a boolean placeholder that defaults to True. One graph then computes the quantized
network (every switch on), the float network (every switch off) and any mixture (one layer quantized, or
every layer but one), which is what a layer-by-layer analysis needs; nothing else in the graph changes.

The choice is TensorFlow's own conditional (Switch on x, Merge of x and Q(x)), not a select of two computed
values: a quantizer whose switch is off receives a dead input and does not run, so a mostly float mixture
costs about what the float network costs (a select computed every quantizer always, doubling the cost of a
float pass of a ResNet). Q(x) of a switched-off layer is therefore not fetchable; x always is. The float tensor is found from the quantizer's own scope, so this works for every
grid (min/max, symmetric, LSQ, PACT) without knowing how it is computed.
"""
import dataclasses
import re
from typing import List

import tensorflow as tf

from tfquant import match, rewrite
from tfquant.errors import TfquantError
from tfquant.ranges import RANGE_SCOPE_SUFFIX

tf1 = tf.compat.v1
WEIGHT_SCOPE = "weight_quant"
SWITCH_SCOPE = "tfquant_switch"


@dataclasses.dataclass
class LayerSwitch:
    """One quantized layer of the report and its switch.

    name: the report's layer name; kind: 'weight' or 'activation'; weight_variable: for weights.
    float_tensor: x, what the layer reads with its quantizer off; quantized_tensor: Q(x).
    output: the tensor the layer's readers read now (Q(x) or x, by the switch).
    layer_output: the weight op's output (weights) or `output` (activations): where the error a layer
      passes on is measured.
    switch: bool placeholder, default True (quantized).
    """

    name: str
    kind: str
    weight_variable: str
    bits: int
    float_tensor: tf.Tensor
    quantized_tensor: tf.Tensor
    output: tf.Tensor
    layer_output: tf.Tensor
    switch: tf.Tensor


class SwitchError(TfquantError, ValueError):
    """A quantized layer of the report has no quantizer this module can find in the graph."""


def _scope_of(name, component):
    """The name-scope prefix of `name` that ends with `component` (or component_N), or None."""
    match = re.match(r"^(.*?/%s(?:_\d+)?)/" % re.escape(component), name)
    return match.group(1) if match else None


def _in_scope(op, scope):
    return op.name.startswith(scope + "/")


def _float_source(quantized, scope):
    """The one float tensor from outside `scope` that the quantizer subgraph of `quantized` reads with its rank."""
    rank = quantized.shape.rank
    seen, frontier, sources = set(), [quantized.op], []
    while frontier:
        op = frontier.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        for tensor in list(op.inputs):
            if _in_scope(tensor.op, scope):
                frontier.append(tensor.op)
            elif (tensor.dtype.is_floating and tensor.shape.rank == rank
                  and tensor.shape.is_compatible_with(quantized.shape)
                  and all(tensor is not known for known in sources)):
                sources.append(tensor)
    if len(sources) != 1:
        raise SwitchError("quantizer %s reads %d float tensors of its rank from outside %s; expected exactly one"
                          % (quantized.name, len(sources), scope))
    return sources[0]


def _activation_quantizer(graph, layer_name, ops_by_scope, unread):
    """(x, Q(x), the quantizer's scope) of the activation quantizer the report names `layer_name`.

    Q(x) is the one non-scalar tensor of the quantizer's scope that ops outside it read (its rerouted
    readers), or, for a tensor nothing read when it was quantized (the logits), the one the report keeps.
    """
    base = "%s/%s" % (layer_name.replace(":", "/"), RANGE_SCOPE_SUFFIX)
    for scope in [base] + ["%s_%d" % (base, i) for i in range(1, 4)]:
        ops = ops_by_scope(scope)
        if not ops:
            continue
        outputs = [t for op in ops for t in op.outputs if t.shape.rank != 0 and t.dtype.is_floating
                   and any(not _in_scope(c, scope) for c in t.consumers())]
        outputs += [t for t in unread if _in_scope(t.op, scope) and all(t is not o for o in outputs)]
        if len(outputs) == 1:
            return _float_source(outputs[0], scope), outputs[0], scope
    raise SwitchError("activation %s: no quantizer found under %s; expected a graph rewritten by quantize_graph"
                      % (layer_name, base))


def _only_quantized_leaves(readers, quantized, scope):
    """Whether nothing outside `scope` but Q(x)'s readers reads what the quantizer computes from x (`readers` on).

    A scale computed from x and read elsewhere (an int32 bias's scale, a folded correction) would be dead with
    the switch off and kill its readers; such a quantizer is switched by a select instead.
    """
    seen, frontier = set(), list(readers)
    while frontier:
        op = frontier.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        downstream = [(tensor, reader) for tensor in op.outputs for reader in tensor.consumers()]
        downstream += [(None, reader) for reader in op._control_outputs]  # pylint: disable=protected-access
        for tensor, reader in downstream:
            if _in_scope(reader, scope):
                frontier.append(reader)
            elif tensor is not quantized:
                return False
    return True


def _gate(quantized, source, scope, switch):
    """Q(x) when `switch` is on, x when off, with the quantizer under `scope` run only when on (module docstring)."""
    readers = [op for op in source.consumers() if _in_scope(op, scope)]
    untouchable = any(match.is_untouchable(op) for op in readers + list(quantized.consumers()))
    if not readers or untouchable or not _only_quantized_leaves(readers, quantized, scope):
        return tf.where(switch, quantized, source)
    when_off, when_on = tf.raw_ops.Switch(data=source, pred=switch)
    # Every path from x to Q(x) inside the scope now starts at `when_on` (_float_source walked them), so Q(x) is
    # dead exactly when the switch is off and Merge passes on the one live input.
    reads = sum(1 for op in readers for tensor in op.inputs if tensor is source)
    if rewrite.reroute_consumers(source, when_on, readers) != reads:
        raise SwitchError("quantizer %s: its readers of %s cannot be moved onto the switch; expected ops of "
                          "quantize_graph under %s" % (quantized.name, source.name, scope))
    output = tf.raw_ops.Merge(inputs=[when_off, quantized])[0]
    output.set_shape(quantized.shape)
    return output


def insert_switches(graph, report, final_tensors=()):
    """Give every quantized layer of `report` a switch (see the module docstring).

    Args:
      graph: an evaluation graph rewritten by quantize_graph (is_training=False).
      report: its QuantReport.
      final_tensors: tensors the caller will fetch (e.g. report.output(logits)); when one of them is a
        quantized tensor nothing reads, its switched replacement is returned in its place.
    Returns:
      ([LayerSwitch] in report order, [final tensors after switching]).
    Raises:
      SwitchError: a quantized layer's quantizer cannot be found.
    """
    by_prefix = {}
    operations = graph.get_operations()

    def ops_by_scope(scope):
        if scope not in by_prefix:
            by_prefix[scope] = [op for op in operations if _in_scope(op, scope)]
        return by_prefix[scope]

    switches, done, finals = [], {}, list(final_tensors)
    for layer in report.layers:
        if not layer.quantized:
            continue
        if layer.kind == "weight":
            op = graph.get_operation_by_name(layer.name)
            quantized = op.inputs[layer.input_index]
            scope = _scope_of(quantized.op.name + "/", WEIGHT_SCOPE)
            if scope is None:
                raise SwitchError("weight layer %s reads %s, which is not a weight quantizer's output"
                                  % (layer.name, quantized.name))
            source = _float_source(quantized, scope)
            layer_output = op.outputs[0]
        else:
            source, quantized, scope = _activation_quantizer(graph, layer.name, ops_by_scope,
                                                             list(report.quantized_outputs.values()))
            layer_output = None
        if quantized.name in done:
            # A weight variable read by several layers has one quantizer: the switch is the first layer's.
            first = done[quantized.name]
            switches.append(dataclasses.replace(first, name=layer.name, layer_output=layer_output
                                                if layer_output is not None else first.output))
            continue
        consumers = list(quantized.consumers())
        with graph.as_default(), graph.name_scope(None), graph.name_scope(SWITCH_SCOPE):
            switch = tf1.placeholder_with_default(True, [], name="on")
            output = _gate(quantized, source, scope, switch)
        rewrite.reroute_consumers(quantized, output, consumers)
        finals = [output if tensor is quantized else tensor for tensor in finals]
        record = LayerSwitch(layer.name, layer.kind, layer.weight_variable, layer.bits, source, quantized, output,
                             layer_output if layer_output is not None else output, switch)
        done[quantized.name] = record
        switches.append(record)
    return switches, finals


def insert_alternative(record, build_fn):
    """Give a switched layer a third position: with its switch off and the returned placeholder on, the layer's
    readers read build_fn(x) instead of x (e.g. x quantized at another width); the alternative runs only then.

    Args:
      record: a LayerSwitch of insert_switches.
      build_fn: x -> a tensor of x's shape and dtype, built under this module's scope.
    Returns:
      the alternative's bool placeholder (default False: the layer's readers see what they saw before).
    Raises:
      SwitchError: the record's output is not a gate insert_switches built.
    """
    gate = record.output.op
    # Where the gate reads x: Merge(x when off, Q(x)), or Select(switch, Q(x), x) for a select-switched quantizer.
    index = {"Merge": 0, "Select": 2, "SelectV2": 2}.get(gate.type)
    if index is None:
        raise SwitchError("layer %s: its switched output %s is not a gate of insert_switches"
                          % (record.name, record.output.name))
    off = gate.inputs[index]
    graph = off.graph
    with graph.as_default(), graph.name_scope(None), graph.name_scope(SWITCH_SCOPE + "/alternative"):
        chosen = tf1.placeholder_with_default(False, [], name="on")
        # Dead when the layer's switch is on (x is dead then), so nothing of it runs unless both select it.
        plain, selected = tf.raw_ops.Switch(data=off, pred=chosen)
        built = build_fn(selected)
        merged = tf.raw_ops.Merge(inputs=[plain, built])[0]
        merged.set_shape(off.shape)
    rewrite.reroute_input(gate, index, merged)
    return chosen


def switch_feed(switches, quantized_names):
    """The feed that quantizes exactly the layers named in `quantized_names` (every other layer float).

    Args:
      switches: [LayerSwitch].
      quantized_names: the names of the layers to keep quantized.
    Returns:
      {switch placeholder: bool}.
    """
    wanted = set(quantized_names)
    feed = {}
    for record in switches:
        # A shared quantizer is on when any layer that reads it is wanted.
        feed[record.switch] = feed.get(record.switch, False) or record.name in wanted
    return feed


def layer_names(switches: List[LayerSwitch]):
    """The names of the switched layers, in report order."""
    return [record.name for record in switches]
