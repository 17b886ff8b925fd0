"""QuantReport: every candidate op, what was quantized and what was skipped and why, and exact storage.

Storage accounting:
  quantized weight: n_params * bits for the codes + 2 * 32 bits (alpha, beta) per range group;
  float weight: 32 bits per parameter;
  other model variables (biases, batch-norm parameters and statistics, activation ranges): 32 bits each.
"""
import dataclasses
import json
import os
import re

from tfquant import files
from tfquant.config import FLOAT_BITS, LayerSetting, QuantConfig
# The records a report is made of live with the schema that checks them; they are names of this module too.
from tfquant.report_schema import (  # noqa: F401 (re-exported)
    KINDS, OPTIONAL_LAYER_FIELDS, QUANTIZED, REPORT_FILE_LIMIT, REPORT_NAME, REPORT_VERSION, SKIPPED, LayerReport,
    ReportError, SchemaError, VariableRecord, layer_layout, report_fields, weight_layer_storage)


def _layer_dict(layer):
    """A LayerReport as a dict, without the optional fields it does not set."""
    data = dataclasses.asdict(layer)
    for field in OPTIONAL_LAYER_FIELDS:
        if data[field] is None:
            del data[field]
    return data


class QuantReport:
    """What `quantize_graph` did to a graph; prints as a table and serialises to JSON."""

    def __init__(self, layers, other_variables, config, is_training, notes=(), allocation=None, fidelity=None):
        self.layers = list(layers)
        # Per-layer quantization error against float (tfquant.fidelity), once measured on a trained model.
        self.fidelity = fidelity
        # The automatic bit allocation (budgets, achieved mean bits, search time, per-layer sensitivity), if any.
        self.allocation = allocation
        self.other_variables = list(other_variables)
        self.config = dict(config)
        self.is_training = bool(is_training)
        self.notes = list(notes)
        # {tensor name: its quantized tensor} for graph outputs quantize_graph quantized before anything read
        # them (see `output`); empty for a report read from a file.
        self.quantized_outputs = {}
        # In training graphs with batch-range activation quantizers: how they run (tfquant.kernels.describe).
        self.activation_path = None
        # {tensor name: its quantized tensor} of every layer output, input or sum quantize_graph quantized
        # (quantize_layer_outputs), read or not; empty for a report read from a file.
        self.quantized_layer_outputs = {}
        # {quantized tensor name: its step} of the tensors an evaluation graph holds on the integer runtimes'
        # grid (tfquant.quantize.quantize_biases); empty for a report read from a file.
        self.integer_steps = {}

    def output(self, tensor):
        """The tensor to read in place of `tensor`: its quantized version if quantize_graph quantized it (a
        model's logits with quantize_layer_outputs: nothing read them yet, or only a head the caller skips, such
        as a model file's softmax, whose input the int8 files then hold quantized), else `tensor` itself."""
        return self.quantized_outputs.get(tensor.name, self.quantized_layer_outputs.get(tensor.name, tensor))

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
            "layers": [_layer_dict(layer) for layer in self.layers],
            "other_variables": [dataclasses.asdict(record) for record in self.other_variables],
            "notes": self.notes,
            "summary": self.summary(),
            **({"allocation": self.allocation} if self.allocation is not None else {}),
            **({"fidelity": self.fidelity} if self.fidelity is not None else {}),
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
            return cls(*report_fields(data))
        except SchemaError as exc:
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
            if layer.bucket_type in ("split", "block"):
                buckets = "%s/%d" % (layer.bucket_type, layer.bucket_size)
            else:
                buckets = layer.bucket_type or "-"
            status = layer.status if layer.quantized else "skipped: " + layer.reason
            if layer.quantized and layer.setting_source:
                status += " (%s grid, buckets %s: %s)" % (layer.weight_grid, buckets, layer.setting_source)
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
    matched by exact op name), and a layer an override gave its own grid or buckets keeps them (an override of its
    escaped variable name), so override patterns stored in the report are never compiled or run.

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
    explicit, overrides = {}, {}
    for layer in report.layers:
        if layer.kind == "activation" or layer.input_index is not None:
            explicit.setdefault(layer.name, layer.bits)
        if layer.kind == "weight" and layer.quantized and layer.setting_source is not None:
            # The layer's own grid and buckets, as an override matching its variable's name literally (an escaped
            # name runs in linear time, unlike a pattern read from the file).
            overrides.setdefault(re.escape(layer.weight_variable), LayerSetting(
                grid=layer.weight_grid, buckets=layer.bucket_type or "none",
                bucket_size=layer.bucket_size if layer.bucket_type in ("split", "block") else None))
    try:
        return QuantConfig(explicit_bits=explicit, weight_overrides=list(overrides.items()), **settings)
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


def _layer_rows(report, fields):
    """Each layer of `report` as the list of its `fields`, through JSON (so tuples and lists compare equal)."""
    layers = json.loads(report.to_json())["layers"]
    return [[layer.get(field) for field in fields] for layer in layers]


def _first_difference(saved_rows, rebuilt_rows, fields):
    """(layer index, the saved layer's name, field, saved value, rebuilt value) of the first differing field of
    two lists of layer rows (the shorter list's length is compared), or None."""
    for index, (saved, rebuilt) in enumerate(zip(saved_rows, rebuilt_rows)):
        for field, saved_value, rebuilt_value in zip(fields, saved, rebuilt):
            if saved_value != rebuilt_value:
                return index, saved[fields.index("name")], field, saved_value, rebuilt_value
    return None


def layer_difference(saved, rebuilt, fields=DECISION_FIELDS):
    """The first (layer index, layer name, field, saved value, rebuilt value) in which the layers of a saved report
    and of the report of the model rebuilt from it differ, over `fields` (which include 'name'), or None. The one
    comparison of per-layer decisions (the learners' evaluation and the export refuse a report with it)."""
    return _first_difference(_layer_rows(saved, fields), _layer_rows(rebuilt, fields), fields)


def decisions_json(report):
    """The per-layer decisions of a report (DECISION_FIELDS of every layer, in order) as compact JSON."""
    return json.dumps(_layer_rows(report, DECISION_FIELDS), separators=(",", ":"))


def decisions_difference(recorded_json, report):
    """None when `report` makes the decisions recorded in `recorded_json` (decisions_json output), else one phrase
    naming the first difference, e.g. "layer 3 (model/conv2/Conv2D) has bits 2 in the report, 4 in the checkpoint".
    """
    try:
        recorded = json.loads(recorded_json)
    except ValueError:
        return "the checkpoint's record of its decisions is not valid JSON"
    current = _layer_rows(report, DECISION_FIELDS)
    if not isinstance(recorded, list) or len(recorded) != len(current):
        return "the report lists %d layers, the checkpoint was trained with %s" % (
            len(current), "%d" % len(recorded) if isinstance(recorded, list) else "an unreadable record")
    for index, (ours, theirs) in enumerate(zip(current, recorded)):
        if not isinstance(theirs, list) or len(theirs) != len(DECISION_FIELDS):
            return "layer %d of the checkpoint's record is malformed" % index
        difference = _first_difference([ours], [theirs], DECISION_FIELDS)
        if difference is not None:
            _, name, field, value, recorded_value = difference
            return "layer %d (%s) has %s %s in the report, %s in the checkpoint" % (
                index, name, field, value, recorded_value)
    return None


if __name__ == "__main__":
    # `python -m tfquant.report RUN_DIR [OTHER_RUN_DIR]`: render quant_report.html again, or compare two runs.
    from tfquant import report_cli
    raise SystemExit(report_cli.main())
