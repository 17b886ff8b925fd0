"""Bit policy: which bits every weight layer and activation gets under a QuantConfig, and why.

This is the one place that decides bits, and each weight layer's grid and bucket layout. Precedence for a weight
layer's bits: `explicit_bits` (by op name), then `layer_bits` (by position in data-flow order), then the first
`weight_overrides` entry whose regex matches the weight variable's name in full (if it sets bits), then the
first/last rule (unless `quantize_all_layers`), then `weight_bits`. That same first matching entry gives the
layer's grid and buckets when it sets them, else the config's do. For an activation: `explicit_bits`, then
`activation_overrides` on the op name, then `activation_bits`. An override that sets a grid or buckets and matches
no layer is an OverrideError (its setting would silently not happen); a bits-only one is a note, as it always was.

The inputs are names only, so a bit allocator can call `decide_bits` on candidate layers without a
graph, and hand its choice back to quantize_graph as `QuantConfig.explicit_bits`.
"""
import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

from tfquant.config import FLOAT_BITS, match_override
from tfquant.layer_settings import OverrideError, check_grid_bits, entry_text

WEIGHT = "weight"
ACTIVATION = "activation"


@dataclasses.dataclass(frozen=True)
class BitDecision:
    """The bits of one op and the rule that gave them.

    Attributes:
      op_name: the matmul-like op (weights) or the activation op.
      kind: WEIGHT or ACTIVATION.
      bits: 1..16, or FLOAT_BITS for float.
      source: the rule that decided: 'explicit_bits', 'layer_bits[i]', "override '<regex>'", 'first/last
        layer rule', 'weight_bits' or 'activation_bits'.
      reason: why the op stays float ('' when it is quantized), as the report shows it.
      grid: a weight layer's grid name (None for activations).
      setting: the LayerSetting of the override that matched a weight layer (None: none did); its buckets,
        when set, replace the config's (QuantConfig.layer_layout).
      setting_source: the rule that chose the grid and buckets: "override '<regex>'" or 'config'.
    """

    op_name: str
    kind: str
    bits: int
    source: str
    reason: str = ""
    grid: Optional[str] = None
    setting: Any = None
    setting_source: str = "config"


@dataclasses.dataclass(frozen=True)
class WeightLayer:
    """A weight layer the policy decides for: its op, and the variable its overrides are matched on."""

    op_name: str
    variable_name: str


@dataclasses.dataclass
class BitPlan:
    """Every decision, in input order (weights first), with the rules that matched nothing."""

    decisions: List[BitDecision]
    unused_weight_overrides: List[str]
    unused_activation_overrides: List[str]

    def __post_init__(self):
        self._by_name = {decision.op_name: decision for decision in self.decisions}

    def decision(self, op_name):
        """The BitDecision for `op_name` (KeyError when the plan has none)."""
        return self._by_name[op_name]


def _float_reason(bits, source):
    return "bits 32 (%s)" % source if bits == FLOAT_BITS else ""


def kept_float_as_first_or_last(position, count, config):
    """Whether the first/last rule keeps the weight layer at `position` of `count` (data-flow order) float."""
    return not config.quantize_all_layers and position in (0, count - 1)


def decide_weight_bits(layers, config):
    """Bits of every quantizable weight layer.

    Args:
      layers: WeightLayer (or (op name, variable name) pairs) in data-flow order: the layers with a weight
        variable, the positions `layer_bits` and the first/last rule count.
      config: a QuantConfig.
    Returns:
      (list of BitDecision in the order of `layers`, override patterns that matched no layer).
    Raises:
      ValueError: `layer_bits` does not have one entry per layer.
    """
    layers = [layer if isinstance(layer, WeightLayer) else WeightLayer(*layer) for layer in layers]
    if config.layer_bits is not None and len(config.layer_bits) != len(layers):
        raise ValueError("layer_bits has %d entries but the graph has %d matmul-like layers with weight "
                         "variables (%s); expected one bit width per layer in data-flow order"
                         % (len(config.layer_bits), len(layers), ", ".join(l.variable_name for l in layers)))
    used, decisions = set(), []
    for position, layer in enumerate(layers):
        setting, pattern = match_override(config.weight_overrides, layer.variable_name)
        explicit = config.explicit_bits_of(layer.op_name)
        if explicit is not None:
            bits, source = explicit, "explicit_bits"
        elif config.layer_bits is not None:
            bits, source = config.layer_bits[position], "layer_bits[%d]" % position
        elif setting is not None and setting.bits is not None:
            bits, source = setting.bits, "override %r" % pattern
        elif kept_float_as_first_or_last(position, len(layers), config):
            edge = "first" if position == 0 else "last"
            bits, source = FLOAT_BITS, "first/last layer rule"
        else:
            bits, source = config.weight_bits, "weight_bits"
        if setting is not None and (source == "override %r" % pattern or not setting.bits_only):
            used.add(pattern)  # a bits-only entry beaten by explicit_bits / layer_bits set nothing, as before
        grid, setting_source = config.weight_grid, "config"
        if setting is not None and not setting.bits_only:
            setting_source = "override %r" % pattern
            if setting.grid is not None:
                grid = setting.grid
                check_grid_bits("%s (layer %s, bits from %s)" % (entry_text("weight_overrides", pattern, setting),
                                                                 layer.op_name, source), grid, bits)
        reason = ("%s layer kept float (quantize_all_layers=False)" % edge if source == "first/last layer rule"
                  else _float_reason(bits, source))
        decisions.append(BitDecision(layer.op_name, WEIGHT, bits, source, reason, grid,
                                     setting if setting_source != "config" else None, setting_source))
    unused = [(regex, setting) for regex, setting in config.weight_overrides if regex.pattern not in used]
    for regex, setting in unused:
        if not setting.bits_only:
            raise OverrideError("%s applies to no layer: it matches no weight variable in full, or an earlier entry "
                                "matches each one it does (variables: %s); expected a regex matching a layer's weight "
                                "variable name in full" % (entry_text("weight_overrides", regex.pattern, setting),
                                                           ", ".join(l.variable_name for l in layers[:6]) or "none"))
    if config.layer_bits is not None:
        return decisions, []  # an explicit list decides every layer's bits; unused bits-only overrides are moot
    return decisions, [regex.pattern for regex, _ in unused]


def decide_activation_bits(op_names, config):
    """Bits of every activation op.

    Args:
      op_names: the activation ops' names.
      config: a QuantConfig.
    Returns:
      (list of BitDecision in the order of `op_names`, override patterns that matched no activation).
    """
    used, decisions = set(), []
    for name in op_names:
        bits, source = config.explicit_bits_of(name), "explicit_bits"
        if bits is None:
            setting, pattern = match_override(config.activation_overrides, name)
            if setting is not None:
                used.add(pattern)
                bits, source = setting.bits, "override %r" % pattern
            else:
                bits, source = config.activation_bits, "activation_bits"
        decisions.append(BitDecision(name, ACTIVATION, bits, source, _float_reason(bits, source)))
    return decisions, [regex.pattern for regex, _ in config.activation_overrides if regex.pattern not in used]


def decide_bits(weight_layers: Sequence[Tuple[str, str]], activation_ops: Sequence[str], config) -> BitPlan:
    """Every bit decision of a graph's candidates under `config` (see the module docstring for precedence).

    Args:
      weight_layers: WeightLayer or (op name, weight variable name) of each quantizable weight layer, in
        data-flow order.
      activation_ops: names of the activation ops.
      config: a QuantConfig.
    Returns:
      a BitPlan.
    """
    weights, unused_weight = decide_weight_bits(weight_layers, config)
    activations, unused_activation = decide_activation_bits(activation_ops, config)
    return BitPlan(weights + activations, unused_weight, unused_activation)
