"""The records a quantization report is made of, and the schema a report read from a file must satisfy.

A report file may come from anywhere (a copied run directory, another release, a hand edit), so every field is
checked for type and range, and each weight layer's storage is recomputed from its shape, bits and layout: the
totals a report prints cannot be inflated or faked. Patterns in a recorded config are checked for length but
never compiled.
"""
import dataclasses
import math
from typing import List, Optional

from tfquant import files
from tfquant.errors import TfquantError
from tfquant.fidelity_schema import check_fidelity
from tfquant.config import FLOAT_BITS, MAX_PATTERN_LENGTH, WEIGHT_GRID_BITS, QuantConfig, weight_grid_of
from tfquant.layout import RANGE_GROUP_BITS, GroupLayout

REPORT_VERSION = 2
# Version 1 reports (no per-layer fidelity) are read as they are.
READABLE_VERSIONS = (1, 2)
# The file name a quantized run gives its report, beside its checkpoints; export looks for it there.
REPORT_NAME = "quant_report.json"
QUANTIZED = "quantized"
SKIPPED = "skipped"
KINDS = ("weight", "activation")
# A report names each layer once; even ResNet-110 has a few hundred. The file limit is the reader's.
REPORT_FILE_LIMIT = files.SMALL_FILE_LIMIT


class ReportError(TfquantError, ValueError):
    """A quantization report is missing, unreadable or malformed; `path` names its file (or None)."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


@dataclasses.dataclass
class LayerReport:
    """One candidate op: a weight layer (kind 'weight') or an activation (kind 'activation')."""

    name: str
    op_type: str
    kind: str
    status: str
    reason: str = ""
    bits: int = FLOAT_BITS
    weight_variable: str = ""
    input_index: Optional[int] = None
    shape: Optional[List[int]] = None
    num_params: int = 0
    bucket_type: Optional[str] = None
    bucket_size: Optional[int] = None
    channel_axes: Optional[List[int]] = None
    num_groups: int = 0
    weight_storage_bits: int = 0
    bucket_storage_bits: int = 0
    range_variables: Optional[List[str]] = None
    # The grid a quantized weight sits on (tfquant.weight_grids name) and the rule that chose its grid and buckets
    # ("override '<regex>'"; None: the config's settings). Reports of older tfquant lack both: the reader fills
    # weight_grid in from the config, which then decided every layer's grid.
    weight_grid: Optional[str] = None
    setting_source: Optional[str] = None

    @property
    def quantized(self):
        return self.status == QUANTIZED

    @property
    def storage_bits(self):
        """Bits this layer's weights take: codes (or float values) plus ranges."""
        return self.weight_storage_bits + self.bucket_storage_bits


def weight_layer_storage(num_params, bits, num_groups):
    """(code bits, range bits) of one weight layer; a float layer has no range bits."""
    if bits == FLOAT_BITS:
        return num_params * FLOAT_BITS, 0
    return num_params * bits, num_groups * RANGE_GROUP_BITS


@dataclasses.dataclass
class VariableRecord:
    """A model variable that is stored as float32 (bias, batch-norm parameter, activation range...)."""

    name: str
    shape: List[int]

    @property
    def storage_bits(self):
        size = 1
        for dim in self.shape:
            size *= dim
        return size * FLOAT_BITS


def layer_layout(layer):
    """The GroupLayout a weight LayerReport records (bucket_type, channel_axes, bucket_size).

    Raises:
      ValueError: the recorded fields do not form a layout.
    """
    return GroupLayout.from_bucket_type(layer.bucket_type, layer.channel_axes, layer.bucket_size)


# ----- schema -------------------------------------------------------------------------------------

class SchemaError(TfquantError, ValueError):
    """A report's dict does not fit the schema (the reader adds which file it came from)."""


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _require(value, check, field, expected):
    if not check(value):
        text = repr(value)
        raise SchemaError("%s=%s is not valid; expected %s"
                           % (field, text if len(text) <= 60 else text[:57] + "...", expected))
    return value


def _count(value, field):
    return _require(value, lambda v: _is_int(v) and v >= 0, field, "a non-negative integer")


def _optional(check):
    return lambda v: v is None or check(v)


def _int_list(value):
    return isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)


def _str_list(value):
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _known_keys(data, allowed, required, field):
    _require(data, lambda v: isinstance(v, dict), field, "an object")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SchemaError("%s has unknown field %r; expected only %s" % (field, unknown[0], ", ".join(allowed)))
    missing = [key for key in required if key not in data]
    if missing:
        raise SchemaError("%s lacks field %r" % (field, missing[0]))


_BITS = (lambda v: _is_int(v) and (1 <= v <= 16 or v == FLOAT_BITS), "1..16 or 32")
_LAYER_FIELDS = [f.name for f in dataclasses.fields(LayerReport)]
_LAYER_CHECKS = {
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "op_type": (lambda v: isinstance(v, str), "a string"),
    "kind": (lambda v: v in KINDS, " or ".join(KINDS)),
    "status": (lambda v: v in (QUANTIZED, SKIPPED), "%r or %r" % (QUANTIZED, SKIPPED)),
    "reason": (lambda v: isinstance(v, str), "a string"),
    "bits": _BITS,
    "weight_variable": (lambda v: isinstance(v, str), "a string"),
    "input_index": (_optional(lambda v: _is_int(v) and v >= 0), "null or a non-negative integer"),
    "shape": (_optional(_int_list), "null or a list of non-negative integers"),
    "bucket_type": (lambda v: v in (None, "channel", "split", "block"), "null, 'channel', 'split' or 'block'"),
    "bucket_size": (_optional(lambda v: _is_int(v) and v >= 1), "null or a positive integer"),
    "channel_axes": (_optional(_int_list), "null or a list of axes"),
    "range_variables": (_optional(_str_list), "null or a list of variable names"),
    "weight_grid": (lambda v: v is None or v in WEIGHT_GRID_BITS, "null or one of " + ", ".join(WEIGHT_GRID_BITS)),
    "setting_source": (_optional(lambda v: isinstance(v, str)), "null or a string"),
}
# Layer fields a report writes only when set, so reports without per-layer settings keep their old form.
OPTIONAL_LAYER_FIELDS = ("weight_grid", "setting_source")


def _setting_value(value):
    """Whether a recorded override's setting has the form LayerSetting.to_json writes (bits, or a dict of them)."""
    if _BITS[0](value):
        return True
    return (isinstance(value, dict) and set(value) <= {"bits", "grid", "buckets", "bucket_size"}
            and _BITS[0](value.get("bits", 1)) and value.get("grid", "minmax") in WEIGHT_GRID_BITS
            and value.get("buckets", "none") in ("none", "channel", "split", "block")
            and (lambda size: _is_int(size) and size >= 1)(value.get("bucket_size", 1)))


def _check_overrides(value, field):
    pairs = _require(value, lambda v: isinstance(v, list), field, "a list of [regex, bits] pairs")
    for i, pair in enumerate(pairs):
        _require(pair, lambda v: isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                 and len(v[0]) <= MAX_PATTERN_LENGTH and _setting_value(v[1]),
                 "%s[%d]" % (field, i), "[regex of at most %d characters, bits or settings]" % MAX_PATTERN_LENGTH)


def _check_config(config):
    """Types and ranges of a recorded config, without compiling any of its patterns."""
    fields = [f.name for f in dataclasses.fields(QuantConfig)]
    _known_keys(config, fields, [], "config")
    for field in ("weight_overrides", "activation_overrides"):
        if field in config:
            _check_overrides(config[field], "config." + field)
    plain = {key: value for key, value in config.items() if key not in ("weight_overrides", "activation_overrides")}
    try:
        QuantConfig(**plain)
    except (TypeError, ValueError) as exc:
        raise SchemaError("config: %s" % " ".join(str(exc).split())) from None


def _groups_of(layer):
    """Range groups a quantized weight layer's recorded layout implies."""
    if layer.bucket_type in ("channel", "block"):
        axes = layer.channel_axes or []
        if not axes or any(a >= len(layer.shape) for a in axes) or sorted(set(axes)) != axes:
            raise SchemaError("layer %s: channel_axes %r do not fit shape %r" % (layer.name, axes, layer.shape))
    if layer.bucket_type in ("split", "block") and layer.bucket_size is None:
        raise SchemaError("layer %s: bucket_type %r needs bucket_size" % (layer.name, layer.bucket_type))
    try:
        return layer_layout(layer).num_groups(layer.shape)
    except ValueError as exc:
        raise SchemaError("layer %s: %s" % (layer.name, exc)) from None


def _check_layer_storage(layer):
    """The layer's numbers agree with each other, so storage totals cannot be inflated or faked."""
    if layer.shape is not None and layer.num_params != math.prod(layer.shape):
        raise SchemaError("layer %s: num_params %d but shape %r" % (layer.name, layer.num_params, layer.shape))
    if layer.kind == "activation":
        if layer.weight_storage_bits or layer.bucket_storage_bits:
            raise SchemaError("activation %s: storage bits must be 0" % layer.name)
        return
    if layer.quantized:
        if layer.bits == FLOAT_BITS or layer.shape is None or layer.input_index is None:
            raise SchemaError("layer %s: quantized, but bits %d / shape %r / input_index %r"
                               % (layer.name, layer.bits, layer.shape, layer.input_index))
        groups = _groups_of(layer)
        if layer.num_groups != groups:
            raise SchemaError("layer %s: num_groups %d, its layout gives %d" % (layer.name, layer.num_groups, groups))
        expected = weight_layer_storage(layer.num_params, layer.bits, groups)
    else:
        expected = weight_layer_storage(layer.num_params, FLOAT_BITS, 0)
    found = (layer.weight_storage_bits, layer.bucket_storage_bits)
    # A variable read by several layers is counted at its first layer and 0 at the others.
    if found != expected and found != (0, 0):
        raise SchemaError("layer %s: storage bits %s, expected %s for its shape and bits"
                           % (layer.name, list(found), list(expected)))


def _layer_from_dict(data, number):
    field = "layers[%d]" % number
    _known_keys(data, _LAYER_FIELDS, ["name", "op_type", "kind", "status"], field)
    for key, (check, expected) in _LAYER_CHECKS.items():
        if key in data:
            _require(data[key], check, "%s.%s" % (field, key), expected)
    for key in ("num_params", "num_groups", "weight_storage_bits", "bucket_storage_bits"):
        if key in data:
            _count(data[key], "%s.%s" % (field, key))
    layer = LayerReport(**data)
    _check_layer_storage(layer)
    return layer


def report_fields(data):
    """The fields of a report's to_dict() form, checked against the schema.

    Args:
      data: the dict (as parsed from JSON).
    Returns:
      (layers: [LayerReport], other variables: [VariableRecord], config dict, is_training, notes, allocation
      dict or None, fidelity dict or None): the arguments of a QuantReport.
    Raises:
      SchemaError: one line naming the first field that is missing, of the wrong type or out of range.
    """
    _known_keys(data, ["version", "config", "is_training", "layers", "other_variables", "notes", "summary",
                       "allocation", "fidelity"],
                ["version", "config", "is_training", "layers", "other_variables"], "report")
    version = data["version"]
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise SchemaError("version=%r is not supported; expected the integer %s (not a tfquant report, or one "
                           "from another release)" % (version, " or ".join(map(str, READABLE_VERSIONS))))
    _check_config(data["config"])
    _require(data["is_training"], lambda v: isinstance(v, bool), "is_training", "true or false")
    layers = [_layer_from_dict(layer, i)
              for i, layer in enumerate(_require(data["layers"], lambda v: isinstance(v, list), "layers", "a list"))]
    config_grid, _ = weight_grid_of(data["config"].get("weight_range", "minmax"),
                                    data["config"].get("weight_scheme", "asymmetric"))
    for layer in layers:
        if layer.kind == "weight" and layer.quantized and layer.weight_grid is None:
            layer.weight_grid = config_grid  # a report of an older tfquant: one grid, the config's
    names = set()
    for layer in layers:
        if layer.name in names:
            raise SchemaError("layer %s is listed twice" % layer.name)
        names.add(layer.name)
    others = []
    for i, record in enumerate(_require(data["other_variables"], lambda v: isinstance(v, list),
                                        "other_variables", "a list")):
        _known_keys(record, ["name", "shape"], ["name", "shape"], "other_variables[%d]" % i)
        _require(record["name"], lambda v: isinstance(v, str) and v != "", "other_variables[%d].name" % i,
                 "a non-empty string")
        _require(record["shape"], _int_list, "other_variables[%d].shape" % i, "a list of non-negative integers")
        others.append(VariableRecord(**record))
    notes = _require(data.get("notes", []), _str_list, "notes", "a list of strings")
    _require(data.get("summary", {}), lambda v: isinstance(v, dict), "summary", "an object")
    allocation = _require(data.get("allocation"), lambda v: v is None or isinstance(v, dict), "allocation",
                          "an object")
    fidelity = data.get("fidelity")
    if fidelity is not None:
        check_fidelity(fidelity, names, SchemaError)
    return layers, others, data["config"], data["is_training"], notes, allocation, fidelity
