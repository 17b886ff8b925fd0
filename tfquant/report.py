"""QuantReport: every candidate op, what was quantized and what was skipped and why, and exact storage.

Storage accounting:
  quantized weight: n_params * bits for the codes + 2 * 32 bits (alpha, beta) per range group;
  float weight: 32 bits per parameter;
  other model variables (biases, batch-norm parameters and statistics, activation ranges): 32 bits each.
"""
import dataclasses
import json
import math
import os
from typing import List, Optional

from tfquant import files
from tfquant.config import FLOAT_BITS, MAX_PATTERN_LENGTH, QuantConfig
from tfquant.layout import RANGE_GROUP_BITS, GroupLayout

REPORT_VERSION = 1
# The file name a quantized run gives its report, beside its checkpoints; export looks for it there.
REPORT_NAME = "quant_report.json"
QUANTIZED = "quantized"
SKIPPED = "skipped"
KINDS = ("weight", "activation")
# A report names each layer once; even ResNet-110 has a few hundred. The file limit is the reader's.
REPORT_FILE_LIMIT = files.SMALL_FILE_LIMIT


class ReportError(ValueError):
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


class QuantReport:
    """What `quantize_graph` did to a graph; prints as a table and serialises to JSON."""

    def __init__(self, layers, other_variables, config, is_training, notes=(), allocation=None):
        self.layers = list(layers)
        # The automatic bit allocation (budgets, achieved mean bits, search time, per-layer sensitivity), if any.
        self.allocation = allocation
        self.other_variables = list(other_variables)
        self.config = dict(config)
        self.is_training = bool(is_training)
        self.notes = list(notes)
        # {tensor name: its quantized tensor} for graph outputs quantize_graph quantized before anything read
        # them (see `output`); empty for a report read from a file.
        self.quantized_outputs = {}
        # {quantized tensor name: its step} of the tensors an evaluation graph holds on the integer runtimes'
        # grid (tfquant.quantize.quantize_biases); empty for a report read from a file.
        self.integer_steps = {}

    def output(self, tensor):
        """The tensor to read in place of `tensor`: its quantized version if quantize_graph quantized it
        while nothing read it yet (a model's logits with quantize_layer_outputs), else `tensor` itself."""
        return self.quantized_outputs.get(tensor.name, tensor)

    # -- selections ---------------------------------------------------------------------------
    @property
    def weight_layers(self):
        return [layer for layer in self.layers if layer.kind == "weight"]

    @property
    def activation_layers(self):
        return [layer for layer in self.layers if layer.kind == "activation"]

    @property
    def quantized_layers(self):
        return [layer for layer in self.layers if layer.quantized]

    @property
    def skipped_layers(self):
        return [layer for layer in self.layers if not layer.quantized]

    # -- storage ------------------------------------------------------------------------------
    @property
    def weight_storage_bits(self):
        """Bits of all matmul-like weights: codes of quantized ones, float32 values of the others."""
        return sum(layer.weight_storage_bits for layer in self.weight_layers)

    @property
    def bucket_storage_bits(self):
        """Bits of the (alpha, beta) pairs of every range group of the quantized weights."""
        return sum(layer.bucket_storage_bits for layer in self.weight_layers)

    @property
    def other_storage_bits(self):
        """Bits of every other stored float32 variable (biases, batch norm, activation ranges)."""
        return sum(record.storage_bits for record in self.other_variables)

    @property
    def total_storage_bits(self):
        return self.weight_storage_bits + self.bucket_storage_bits + self.other_storage_bits

    @property
    def float_storage_bits(self):
        """Bits of the same model with every variable in float32 (activation ranges excluded)."""
        weights = sum(layer.num_params for layer in self.weight_layers) * FLOAT_BITS
        range_names = {name for layer in self.activation_layers for name in (layer.range_variables or [])}
        others = sum(r.storage_bits for r in self.other_variables if r.name not in range_names)
        return weights + others

    @property
    def compression_ratio(self):
        """float_storage_bits / total_storage_bits."""
        return self.float_storage_bits / max(self.total_storage_bits, 1)

    @property
    def weight_compression_ratio(self):
        """Compression of the matmul-like weights alone (codes and ranges against float32)."""
        stored = self.weight_storage_bits + self.bucket_storage_bits
        return sum(layer.num_params for layer in self.weight_layers) * FLOAT_BITS / max(stored, 1)

    # -- output -------------------------------------------------------------------------------
    def summary(self):
        """Totals as a dict."""
        return {
            "weight_layers": len(self.weight_layers),
            "weight_layers_quantized": sum(layer.quantized for layer in self.weight_layers),
            "activation_layers": len(self.activation_layers),
            "activation_layers_quantized": sum(layer.quantized for layer in self.activation_layers),
            "weight_storage_bits": self.weight_storage_bits,
            "bucket_storage_bits": self.bucket_storage_bits,
            "other_storage_bits": self.other_storage_bits,
            "total_storage_bits": self.total_storage_bits,
            "float_storage_bits": self.float_storage_bits,
            "compression_ratio": self.compression_ratio,
            "weight_compression_ratio": self.weight_compression_ratio,
        }

    def to_dict(self):
        return {
            "version": REPORT_VERSION,
            "config": self.config,
            "is_training": self.is_training,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "other_variables": [dataclasses.asdict(record) for record in self.other_variables],
            "notes": self.notes,
            "summary": self.summary(),
            **({"allocation": self.allocation} if self.allocation is not None else {}),
        }

    def to_json(self, indent=2):
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data, path=None):
        """Rebuild a report from `to_dict()` output, checked against the report schema.

        Args:
          data: the dict (as parsed from JSON).
          path: the file it came from, named in errors.
        Returns:
          a QuantReport.
        Raises:
          ReportError: one line naming the first field that is missing, of the wrong type or out of range.
        """
        where = "quantization report" if path is None else "quantization report %s" % os.fspath(path)
        try:
            return _report_from_dict(cls, data)
        except _SchemaError as exc:
            raise ReportError("%s: %s" % (where, exc), path) from None

    @classmethod
    def from_json(cls, text, path=None):
        """Rebuild a report from `to_json()` output (strict JSON: depth limit, no duplicate keys, no NaN)."""
        where = "quantization report" if path is None else "quantization report %s" % os.fspath(path)
        data = files.loads_json(text, lambda message: ReportError(message, path), where)
        return cls.from_dict(data, path)

    def format_table(self):
        """A fixed-width table of every candidate, then the storage totals."""
        header = ("layer", "type", "bits", "buckets", "groups", "params", "storage bits", "status")
        rows = []
        for layer in self.layers:
            if layer.bucket_type == "split":
                buckets = "split/%d" % layer.bucket_size
            else:
                buckets = layer.bucket_type or "-"
            status = layer.status if layer.quantized else "skipped: " + layer.reason
            name = layer.weight_variable or layer.name
            rows.append((name, layer.op_type, str(layer.bits), buckets if layer.kind == "weight" else "-",
                         str(layer.num_groups) if layer.num_groups else "-",
                         str(layer.num_params) if layer.num_params else "-",
                         str(layer.storage_bits) if layer.kind == "weight" else "-", status))
        widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                 for row in [header] + rows]
        total = self.summary()
        lines.append("weights: %d of %d quantized; activations: %d of %d quantized"
                     % (total["weight_layers_quantized"], total["weight_layers"],
                        total["activation_layers_quantized"], total["activation_layers"]))
        lines.append("storage: weights %d + ranges %d + other float %d = %d bits (%.1f KiB); float32 model "
                     "%d bits (%.1f KiB); compression %.2fx (weights alone %.2fx)"
                     % (self.weight_storage_bits, self.bucket_storage_bits, self.other_storage_bits,
                        self.total_storage_bits, self.total_storage_bits / 8192.0, self.float_storage_bits,
                        self.float_storage_bits / 8192.0, self.compression_ratio,
                        self.weight_compression_ratio))
        lines.extend(_allocation_lines(self.allocation))
        lines.extend("note: " + note for note in self.notes)
        return "\n".join(lines)

    def __str__(self):
        return self.format_table()


def _allocation_lines(allocation):
    """Table lines of an automatic bit allocation: per budget the achieved mean, then each layer's choice."""
    def number(value, form):
        # The entry may come from a file: show odd values as they are rather than fail on them.
        return form % value if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    if not allocation:
        return []
    lines = []
    for kind in ("weight", "activation"):
        entry = allocation.get(kind)
        if not isinstance(entry, dict):
            continue
        lines.append("auto bits (%s): budget %s mean bits (%s storage bits), achieved %s (%s); search %s s"
                     % (kind, entry.get("equivalent_bits"), entry.get("budget_bits"),
                        number(entry.get("mean_bits"), "%.3f"), entry.get("used_bits"),
                        number(allocation.get("search_seconds"), "%.1f")))
        for layer in entry.get("layers", []) if isinstance(entry.get("layers"), list) else []:
            if not isinstance(layer, dict):
                continue
            sensitivity = layer.get("sensitivity")
            shown = " ".join("%s:%s" % (bits, number(value, "%.4g"))
                             for bits, value in (sensitivity.items() if isinstance(sensitivity, dict) else []))
            lines.append("  %s  bits %s  sensitivity by bits %s" % (layer.get("name"), layer.get("bits"), shown))
    return lines


def read_report(path):
    """The QuantReport in a JSON file: a regular file of bounded size, strictly parsed and validated.

    Args:
      path: the quant_report.json path.
    Returns:
      a QuantReport.
    Raises:
      ReportError: one line naming the path and what is wrong.
    """
    path = os.fspath(path)
    text = files.read_text(path, lambda message: ReportError(message, path), "quantization report",
                           REPORT_FILE_LIMIT)
    return QuantReport.from_json(text, path)


def layer_layout(layer):
    """The GroupLayout a weight LayerReport records (bucket_type, channel_axes, bucket_size).

    Raises:
      ValueError: the recorded fields do not form a layout.
    """
    return GroupLayout.from_bucket_type(layer.bucket_type, layer.channel_axes, layer.bucket_size)


def load_report(report):
    """A QuantReport from a QuantReport, its to_dict() form or the path of its JSON file.

    Args:
      report: QuantReport, dict or path.
    Returns:
      a QuantReport.
    Raises:
      ReportError: the file is not a regular readable file or the report does not fit its schema.
    """
    if isinstance(report, QuantReport):
        return report
    if isinstance(report, dict):
        return QuantReport.from_dict(report)
    return read_report(report)


def config_from_report(report):
    """The QuantConfig that replays a report's recorded decisions, without any pattern from the report.

    Every weight layer and activation keeps the bits the report records for it (as `explicit_bits`,
    matched by exact op name), so override patterns stored in the report are never compiled or run.

    Args:
      report: a QuantReport (validated, e.g. by read_report).
    Returns:
      a QuantConfig with the report's buckets and activation-range settings, explicit per-op bits and
      no overrides.
    Raises:
      ReportError: the recorded settings do not form a valid config.
    """
    settings = {key: value for key, value in report.config.items()
                if key not in ("weight_overrides", "activation_overrides", "layer_bits", "explicit_bits")}
    explicit = {}
    for layer in report.layers:
        if layer.kind == "activation" or layer.input_index is not None:
            explicit.setdefault(layer.name, layer.bits)
    try:
        return QuantConfig(explicit_bits=explicit, **settings)
    except (TypeError, ValueError) as exc:
        raise ReportError("quantization report config is not valid: %s" % " ".join(str(exc).split())) from None


# A quantized checkpoint carries its own decisions (a string variable the learners add beside the model), so
# a report can be checked against the checkpoint it claims to describe: the float shadow weights alone cannot
# say whether they were trained at 4 or 2 bits.
DECISIONS_VARIABLE = "tfquant/decisions"
DECISION_FIELDS = ("kind", "name", "status", "bits", "weight_variable", "shape", "bucket_type", "bucket_size",
                   "channel_axes", "num_groups", "range_variables")


def unmatched_layers(saved, rebuilt):
    """None when both reports list the same layer names, else one phrase naming the first unmatched layer, e.g.
    "the model rebuilt from it also quantizes Mean, which the report does not list"."""
    theirs, ours = [layer.name for layer in saved.layers], [layer.name for layer in rebuilt.layers]
    extra = [name for name in ours if name not in set(theirs)]
    if extra:
        return ("the model rebuilt from it also quantizes %s, which the report does not list (a run of an "
                "earlier tfquant, which did not quantize it, must be retrained)" % ", ".join(extra[:3]))
    missing = [name for name in theirs if name not in set(ours)]
    if missing:
        return "the report lists %s, which the model rebuilt from it does not have" % ", ".join(missing[:3])
    return None


def decisions_json(report):
    """The per-layer decisions of a report (DECISION_FIELDS of every layer, in order) as compact JSON."""
    layers = json.loads(report.to_json())["layers"]  # through JSON, so tuples and lists compare equal
    return json.dumps([[layer.get(field) for field in DECISION_FIELDS] for layer in layers], separators=(",", ":"))


def decisions_difference(recorded_json, report):
    """None when `report` makes the decisions recorded in `recorded_json` (decisions_json output), else one phrase
    naming the first difference, e.g. "layer 3 (model/conv2/Conv2D) has bits 2 in the report, 4 in the checkpoint".
    """
    try:
        recorded = json.loads(recorded_json)
    except ValueError:
        return "the checkpoint's record of its decisions is not valid JSON"
    current = json.loads(decisions_json(report))
    if not isinstance(recorded, list) or len(recorded) != len(current):
        return "the report lists %d layers, the checkpoint was trained with %s" % (
            len(current), "%d" % len(recorded) if isinstance(recorded, list) else "an unreadable record")
    for index, (theirs, ours) in enumerate(zip(recorded, current)):
        if not isinstance(theirs, list) or len(theirs) != len(DECISION_FIELDS):
            return "layer %d of the checkpoint's record is malformed" % index
        for field, recorded_value, value in zip(DECISION_FIELDS, theirs, ours):
            if recorded_value != value:
                return "layer %d (%s) has %s %s in the report, %s in the checkpoint" % (
                    index, ours[DECISION_FIELDS.index("name")], field, value, recorded_value)
    return None


# ----- schema -------------------------------------------------------------------------------------

class _SchemaError(ValueError):
    pass


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _require(value, check, field, expected):
    if not check(value):
        text = repr(value)
        raise _SchemaError("%s=%s is not valid; expected %s"
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
        raise _SchemaError("%s has unknown field %r; expected only %s" % (field, unknown[0], ", ".join(allowed)))
    missing = [key for key in required if key not in data]
    if missing:
        raise _SchemaError("%s lacks field %r" % (field, missing[0]))


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
    "bucket_type": (lambda v: v in (None, "channel", "split"), "null, 'channel' or 'split'"),
    "bucket_size": (_optional(lambda v: _is_int(v) and v >= 1), "null or a positive integer"),
    "channel_axes": (_optional(_int_list), "null or a list of axes"),
    "range_variables": (_optional(_str_list), "null or a list of variable names"),
}


def _check_overrides(value, field):
    pairs = _require(value, lambda v: isinstance(v, list), field, "a list of [regex, bits] pairs")
    for i, pair in enumerate(pairs):
        _require(pair, lambda v: isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                 and len(v[0]) <= MAX_PATTERN_LENGTH and _BITS[0](v[1]),
                 "%s[%d]" % (field, i), "[regex of at most %d characters, bits]" % MAX_PATTERN_LENGTH)


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
        raise _SchemaError("config: %s" % " ".join(str(exc).split())) from None


def _groups_of(layer):
    """Range groups a quantized weight layer's recorded layout implies."""
    if layer.bucket_type == "channel":
        axes = layer.channel_axes or []
        if not axes or any(a >= len(layer.shape) for a in axes) or sorted(set(axes)) != axes:
            raise _SchemaError("layer %s: channel_axes %r do not fit shape %r" % (layer.name, axes, layer.shape))
    if layer.bucket_type == "split" and layer.bucket_size is None:
        raise _SchemaError("layer %s: bucket_type 'split' needs bucket_size" % layer.name)
    try:
        return layer_layout(layer).num_groups(layer.shape)
    except ValueError as exc:
        raise _SchemaError("layer %s: %s" % (layer.name, exc)) from None


def _check_layer_storage(layer):
    """The layer's numbers agree with each other, so storage totals cannot be inflated or faked."""
    if layer.shape is not None and layer.num_params != math.prod(layer.shape):
        raise _SchemaError("layer %s: num_params %d but shape %r" % (layer.name, layer.num_params, layer.shape))
    if layer.kind == "activation":
        if layer.weight_storage_bits or layer.bucket_storage_bits:
            raise _SchemaError("activation %s: storage bits must be 0" % layer.name)
        return
    if layer.quantized:
        if layer.bits == FLOAT_BITS or layer.shape is None or layer.input_index is None:
            raise _SchemaError("layer %s: quantized, but bits %d / shape %r / input_index %r"
                               % (layer.name, layer.bits, layer.shape, layer.input_index))
        groups = _groups_of(layer)
        if layer.num_groups != groups:
            raise _SchemaError("layer %s: num_groups %d, its layout gives %d" % (layer.name, layer.num_groups, groups))
        expected = weight_layer_storage(layer.num_params, layer.bits, groups)
    else:
        expected = weight_layer_storage(layer.num_params, FLOAT_BITS, 0)
    found = (layer.weight_storage_bits, layer.bucket_storage_bits)
    # A variable read by several layers is counted at its first layer and 0 at the others.
    if found != expected and found != (0, 0):
        raise _SchemaError("layer %s: storage bits %s, expected %s for its shape and bits"
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


def _report_from_dict(cls, data):
    _known_keys(data, ["version", "config", "is_training", "layers", "other_variables", "notes", "summary",
                       "allocation"],
                ["version", "config", "is_training", "layers", "other_variables"], "report")
    version = data["version"]
    if not _is_int(version) or version != REPORT_VERSION:
        raise _SchemaError("version=%r is not supported; expected the integer %d (not a tfquant report, or one "
                           "from another release)" % (version, REPORT_VERSION))
    _check_config(data["config"])
    _require(data["is_training"], lambda v: isinstance(v, bool), "is_training", "true or false")
    layers = [_layer_from_dict(layer, i)
              for i, layer in enumerate(_require(data["layers"], lambda v: isinstance(v, list), "layers", "a list"))]
    names = set()
    for layer in layers:
        if layer.name in names:
            raise _SchemaError("layer %s is listed twice" % layer.name)
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
    return cls(layers, others, data["config"], data["is_training"], notes, allocation)
