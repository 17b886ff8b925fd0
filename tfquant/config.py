"""QuantConfig: the validated quantization policy (bits per layer, buckets, activation ranges)."""
import dataclasses
import math
import re
from typing import Mapping, Optional, Sequence, Tuple

from tfquant.config_bits import (  # noqa: F401 (re-exported: the names every module knows from here)
    FLOAT_BITS, MAX_CODE_BITS, VALID_BITS_TEXT, VALID_CODE_BITS_TEXT, WEIGHT_GRID_BITS, check_bits)
from tfquant.layer_settings import (  # noqa: F401 (LayerSetting: the override's type)
    LayerSetting, OverrideError, check_grid_bits, checked_setting, entry_text, parse_spec)
from tfquant.layout import MIN_BLOCK_SIZE, GroupLayout, valid_block_size

BUCKET_TYPES = ("channel", "split", "block")
ACT_RANGES = ("ema", "batch", "pact", "lsq")
WEIGHT_RANGES = ("minmax", "lsq", "ternary", "binary")
RECOMPUTE_CHOICES = ("none", "weights", "all")
WEIGHT_SCHEMES = ("asymmetric", "symmetric")
LEARNED_ACT_RANGES = ("pact", "lsq")
# Python's re module has no time limit, and a pattern such as "(.*.*)*Z" can run for minutes on a
# long name; patterns are therefore only accepted from the user who runs tfquant (never read back
# from a report), and kept short so a pasted or generated mistake is caught early.
MAX_PATTERN_LENGTH = 1000


def weight_grid_of(weight_range, weight_scheme):
    """(the name of the weight grid a weight_range and weight_scheme choose, (field, value) of the setting that
    chose it): weight_scheme='symmetric' chooses the symmetric grid, otherwise weight_range names the grid."""
    if weight_scheme == "symmetric":
        return "symmetric", ("weight_scheme", weight_scheme)
    return weight_range, ("weight_range", weight_range)


def _normalise_overrides(field, overrides):
    """Turn a mapping or a sequence of (pattern, setting) pairs into a tuple of (compiled regex, LayerSetting);
    a setting is bits, a LayerSetting or a dict of its fields (tfquant.layer_settings)."""
    if overrides is None:
        return ()
    items = overrides.items() if hasattr(overrides, "items") else overrides
    result = []
    try:
        pairs = list(items)
    except TypeError:
        raise ValueError("%s=%r is not valid; expected an ordered mapping or a list of (regex, bits) pairs"
                         % (field, overrides))
    for pair in pairs:
        if isinstance(pair, str) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise ValueError("%s entry %r is not valid; expected a (regex, bits) pair" % (field, pair))
        pattern, setting = pair
        if isinstance(pattern, re.Pattern):
            pattern = pattern.pattern  # a config's own entries, given again (dataclasses.replace)
        if not isinstance(pattern, str):
            raise ValueError("%s entry %r is not valid; expected the regex to be a string" % (field, pair))
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise ValueError("%s regex %r... is %d characters long; expected at most %d"
                             % (field, pattern[:40], len(pattern), MAX_PATTERN_LENGTH))
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise OverrideError("%s regex %r is not valid (%s); expected a Python regular expression"
                                % (field, pattern, exc))
        result.append((compiled, checked_setting(field, pattern, setting, field != "activation_overrides")))
    return tuple(result)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; every field is checked when the config is constructed.

    Attributes:
      weight_bits: default bits for the weights of Conv2D / MatMul / BatchMatMulV2 /
        DepthwiseConv2dNative ops (32 leaves them float).
      activation_bits: default bits for the outputs of activation ops (32 leaves them float).
      use_buckets: give each bucket of a weight its own range (alpha, beta); otherwise one per layer.
      bucket_type: 'channel' (one bucket per output channel) or 'split' (fixed-size pieces of the
        row-major flattened weight).
      bucket_size: elements per bucket for 'split'.
      quantize_all_layers: False keeps the first and the last matmul-like op (in data-flow order from
        the input) in float unless an override or `layer_bits` names their bits.
      layer_bits: explicit weight bits per matmul-like layer, in data-flow order; its length must equal
        the number of layers found. Takes precedence over everything else for weights.
      weight_overrides: ordered (regex, bits) pairs (or an ordered mapping) matched in full against a
        layer's weight variable name; the first match wins. Beats the first/last rule.
      activation_overrides: the same for activation op names.
      act_range: 'ema' (batch min/max in training, moving averages of them at evaluation) or 'batch'
        (min/max of the current batch everywhere, PocketFlow's behaviour).
      act_ema_decay: decay of the activation-range moving averages, in (0, 1).
        PACT/LSQ ranges are learned: 'pact' trains a clipping level alpha per activation, 'lsq' a step
        size (plus an offset, LSQ+, for activations that can be negative); see tfquant.ranges.
      pact_decay: weight of the L2 decay pact_decay * alpha^2 / 2 on every PACT clipping level, >= 0.
        The default equals the ResNet recipe's weight decay, so alpha shrinks at the rate the weights do.
      weight_range: 'minmax' (alpha = max - min per range group, PocketFlow's formula), 'lsq' (a
        trained step size per range group on a signed grid; needs at least 2 bits), 'ternary' (codes -1, 0, +1
        times a per-group scale, TWN; 2 bits) or 'binary' (sign times the group's mean |w|; 1 bit).
      explicit_bits: {op name: bits} for weight ops and activation ops, compared as plain strings
        (never as patterns); beats every other rule. It replays the decisions a QuantReport
        recorded (see tfquant.report.config_from_report) without evaluating the regular
        expressions of a file. Op names it lists that the graph lacks are noted in the report.
      weight_scheme: 'asymmetric' (min/max grid, the default) or 'symmetric' (zero point 0, codes
        -(2^(k-1)-1) .. 2^(k-1)-1 times max|w| / (2^(k-1)-1) per range group; needs >= 2 bits and
        weight_range='minmax').
      fold_batch_norms: quantize the batch-norm-folded weight W * gamma / sigma of every Conv2D /
        DepthwiseConv2dNative / MatMul that feeds a batch norm (see tfquant.fold).
      freeze_bn_delay: with fold_batch_norms in a training graph, the global step from which the
        moving statistics replace the batch statistics; None never switches.
      recompute_quantized: in a training graph, which quantized tensors the backward pass rebuilds instead of
        keeping them from the forward pass (tfquant.recompute): 'none' (the default), 'weights' or 'all' (weights
        and activations). Less peak memory (ResNet-50 W4A4 at 224x224: 1.15x float with none, 1.01x with all)
        for more work per step; the values and gradients are the same bit for bit.
      quantize_layer_outputs: quantize, like activations (activation_bits, overrides, 'ema' ranges),
        every other tensor an int8 model holds: the model input a weight layer reads, each weight
        layer's output after its bias unless only quantized activations read it (e.g. before a
        residual add, and the logits), and residual sums; and put every activation on the grid
        integer runtimes use (zero exactly representable). The trained graph then computes what the
        int8 TFLite / ONNX model computes, and the export needs no calibration data. Needs
        act_range='ema' and activation_bits of 2..16 (or 32, which leaves them float). With
        act_range='lsq' instead the same tensors get learned steps (LSQ+ offsets where they can be
        negative: MobileNetV2's linear bottlenecks and residual sums), a training recipe: their grid is
        not the runtimes' zero-exact one, so an int8 / ONNX export calibrates their ranges. Logits that
        nothing reads yet when quantize_graph runs are quantized too: build the loss on
        `report.output(logits)`.

    Regular expressions in overrides are Python's, which are not time-bounded: a pattern with
    nested repetition can take exponential time on some names. Only pass patterns you trust.
    """

    weight_bits: int = 4
    activation_bits: int = 32
    use_buckets: bool = False
    bucket_type: str = "channel"
    bucket_size: int = 256
    quantize_all_layers: bool = False
    layer_bits: Optional[Sequence[int]] = None
    weight_overrides: Tuple = ()
    activation_overrides: Tuple = ()
    act_range: str = "ema"
    act_ema_decay: float = 0.99
    pact_decay: float = 2e-4
    weight_range: str = "minmax"
    explicit_bits: Optional[Mapping[str, int]] = None
    weight_scheme: str = "asymmetric"
    fold_batch_norms: bool = False
    freeze_bn_delay: Optional[int] = None
    quantize_layer_outputs: bool = False
    recompute_quantized: str = "none"

    def __post_init__(self):
        check_bits("weight_bits", self.weight_bits)
        check_bits("activation_bits", self.activation_bits)
        for field in ("use_buckets", "quantize_all_layers", "fold_batch_norms", "quantize_layer_outputs"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError("%s=%r is not valid; expected True or False" % (field, getattr(self, field)))
        if self.bucket_type not in BUCKET_TYPES:
            raise ValueError("bucket_type=%r is not valid; expected one of %s"
                             % (self.bucket_type, ", ".join(repr(t) for t in BUCKET_TYPES)))
        if isinstance(self.bucket_size, bool) or not isinstance(self.bucket_size, int) or self.bucket_size < 1:
            raise ValueError("bucket_size=%r is not valid; expected a positive integer" % (self.bucket_size,))
        if self.use_buckets and self.bucket_type == "block" and not valid_block_size(self.bucket_size):
            raise ValueError("bucket_size=%r is not valid with bucket_type='block'; expected a power of 2 >= %d "
                             "(the block sizes of the runtimes' k-bit kernels)" % (self.bucket_size, MIN_BLOCK_SIZE))
        if self.act_range not in ACT_RANGES:
            raise ValueError("act_range=%r is not valid; expected one of %s"
                             % (self.act_range, ", ".join(repr(r) for r in ACT_RANGES)))
        decay = self.act_ema_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError("act_ema_decay=%r is not valid; expected a number strictly between 0 and 1"
                             % (decay,))
        pact_decay = self.pact_decay
        if (isinstance(pact_decay, bool) or not isinstance(pact_decay, (int, float))
                or not math.isfinite(pact_decay) or pact_decay < 0):
            raise ValueError("pact_decay=%r is not valid; expected a finite number >= 0" % (pact_decay,))
        if self.weight_range not in WEIGHT_RANGES:
            raise ValueError("weight_range=%r is not valid; expected one of %s"
                             % (self.weight_range, ", ".join(repr(r) for r in WEIGHT_RANGES)))
        if self.weight_scheme not in WEIGHT_SCHEMES:
            raise ValueError("weight_scheme=%r is not valid; expected one of %s"
                             % (self.weight_scheme, ", ".join(repr(s) for s in WEIGHT_SCHEMES)))
        if self.weight_scheme == "symmetric" and self.weight_range != "minmax":
            raise ValueError("weight_scheme='symmetric' is not valid with weight_range=%r; expected "
                             "weight_range='minmax' (LSQ learns its own signed grid)" % (self.weight_range,))
        if self.quantize_layer_outputs:
            if self.act_range not in ("ema", "lsq"):
                raise ValueError("quantize_layer_outputs=True is not valid with act_range=%r; expected "
                                 "act_range='ema' (the exported int8 ranges are the moving averages) or 'lsq' "
                                 "(learned steps, LSQ+ offsets on the signed outputs)" % (self.act_range,))
            if self.activation_bits == 1:
                raise ValueError("quantize_layer_outputs=True is not valid with activation_bits=1; expected 2 "
                                 "to 16 bits, or 32")
        if self.recompute_quantized not in RECOMPUTE_CHOICES:
            raise ValueError("recompute_quantized=%r is not valid; expected one of %s"
                             % (self.recompute_quantized, ", ".join(RECOMPUTE_CHOICES)))
        delay = self.freeze_bn_delay
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int) or delay < 0):
            raise ValueError("freeze_bn_delay=%r is not valid; expected None or an integer >= 0" % (delay,))
        if self.layer_bits is not None:
            if isinstance(self.layer_bits, (str, bytes)) or not hasattr(self.layer_bits, "__iter__"):
                raise ValueError("layer_bits=%r is not valid; expected a list of bit widths, one per layer"
                                 % (self.layer_bits,))
            bits = tuple(check_bits("layer_bits[%d]" % i, b) for i, b in enumerate(self.layer_bits))
            object.__setattr__(self, "layer_bits", bits)
        if self.explicit_bits is not None:
            if not hasattr(self.explicit_bits, "items"):
                raise ValueError("explicit_bits=%r is not valid; expected a mapping of op names to bit widths"
                                 % (self.explicit_bits,))
            explicit = {}
            for name, bits in self.explicit_bits.items():
                if not isinstance(name, str) or not name:
                    raise ValueError("explicit_bits key %r is not valid; expected an op name" % (name,))
                explicit[name] = check_bits("explicit_bits[%r]" % name, bits)
            # Stored as pairs so the frozen config stays hashable; looked up through a dict.
            object.__setattr__(self, "explicit_bits", tuple(explicit.items()))
        object.__setattr__(self, "_explicit_lookup", dict(self.explicit_bits or ()))
        object.__setattr__(self, "weight_overrides",
                           _normalise_overrides("weight_overrides", self.weight_overrides))
        object.__setattr__(self, "activation_overrides",
                           _normalise_overrides("activation_overrides", self.activation_overrides))
        # A grid takes only some widths (LSQ's signed grid and the narrow symmetric grid have no positive level
        # at 1 bit; ternary codes take 2 bits, binary 1).
        grid, (field, value) = weight_grid_of(self.weight_range, self.weight_scheme)
        setting, (fewest, most) = "%s=%r" % (field, value), WEIGHT_GRID_BITS[grid]
        sources = [("weight_bits", self.weight_bits)] + [
            ("layer_bits[%d]" % i, b) for i, b in enumerate(self.layer_bits or ())] + [
            ("weight_overrides %r" % regex.pattern, s.bits) for regex, s in self.weight_overrides
            if s.bits is not None and s.grid is None]
        for regex, setting in self.weight_overrides:
            if setting.buckets == "block" and setting.bucket_size is None and not valid_block_size(self.bucket_size):
                raise OverrideError("%s is not valid with bucket_size=%d; expected block/N with N a power of 2 >= %d"
                                    % (entry_text("weight_overrides", regex.pattern, setting), self.bucket_size,
                                       MIN_BLOCK_SIZE))
            if setting.grid is not None and setting.bits is not None:
                check_grid_bits(entry_text("weight_overrides", regex.pattern, setting), setting.grid, setting.bits)
        for field, bits in sources:
            if bits != FLOAT_BITS and not fewest <= bits <= most:
                raise ValueError("%s=%d is not valid with %s; expected %s bits, or 32"
                                 % (field, bits, setting, fewest if fewest == most else "%d to %d" % (fewest, most)))

    def explicit_bits_of(self, op_name):
        """Bits `explicit_bits` gives the op named `op_name`, or None when it names no such op."""
        return self._explicit_lookup.get(op_name)

    @property
    def weight_bucket_type(self):
        """The bucket type weights use: None without buckets, else `bucket_type`."""
        return self.bucket_type if self.use_buckets else None

    def weight_layout(self, channel_axes):
        """The GroupLayout of a weight whose output channels lie on `channel_axes`."""
        return GroupLayout.from_bucket_type(self.weight_bucket_type, channel_axes, self.bucket_size)

    def layer_layout(self, channel_axes, setting=None):
        """The GroupLayout of a weight on `channel_axes` under an override's LayerSetting (None: the config's)."""
        if setting is None or setting.buckets is None:
            return self.weight_layout(channel_axes)
        bucket_type = None if setting.buckets == "none" else setting.buckets
        size = setting.bucket_size if setting.bucket_size is not None else self.bucket_size
        return GroupLayout.from_bucket_type(bucket_type, channel_axes, size)

    @property
    def weight_grid(self):
        """The name of the weight grid layers without an override's grid use."""
        return weight_grid_of(self.weight_range, self.weight_scheme)[0]

    def to_dict(self):
        """A JSON-able description of the config (regexes as their pattern strings)."""
        result = dataclasses.asdict(self)
        for field in ("weight_overrides", "activation_overrides"):
            result[field] = [[regex.pattern, setting.to_json()] for regex, setting in getattr(self, field)]
        if self.layer_bits is not None:
            result["layer_bits"] = list(self.layer_bits)
        if self.explicit_bits is None:
            del result["explicit_bits"]  # reports of configs without it keep their old form
        else:
            result["explicit_bits"] = dict(self.explicit_bits)
        return result


def parse_overrides(field, text_items):
    """Parse ['regex=SPEC', ...] strings (as given on a command line) into (regex, setting) pairs.

    Args:
      field: the setting's name, used in error messages.
      text_items: iterable of strings 'regex=bits' or 'regex=SPEC' (tfquant.layer_settings: e.g.
        'model/conv1/.*=4:channel:symmetric'); the last '=' separates the regex from its settings.
    Returns:
      a list of (pattern, setting) pairs in the given order: setting is the bits (an int) for 'regex=bits',
      else a LayerSetting.
    Raises:
      OverrideError (a ValueError) naming the entry.
    """
    pairs = []
    for item in text_items:
        pattern, sep, spec = item.rpartition("=")
        if not sep or not pattern:
            raise OverrideError("%s entry %r is not valid; expected 'regex=bits' or 'regex=SPEC'" % (field, item))
        setting = parse_spec(field, item, spec)
        pairs.append((pattern, setting.bits if setting.bits_only else setting))
    return pairs


def match_override(overrides, name):
    """Return (LayerSetting, pattern) of the first override whose regex matches `name` in full, or (None, None)."""
    for regex, setting in overrides:
        if regex.fullmatch(name):
            return setting, regex.pattern
    return None, None
