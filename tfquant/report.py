"""QuantReport: every candidate op, what was quantized and what was skipped and why, and exact storage.

Storage accounting:
  quantized weight: n_params * bits for the codes + 2 * 32 bits (alpha, beta) per range group;
  float weight: 32 bits per parameter;
  other model variables (biases, batch-norm parameters and statistics, activation ranges): 32 bits each.
"""
import dataclasses
import json
from typing import List, Optional

REPORT_VERSION = 1
FLOAT_BITS = 32
RANGE_BITS = 2 * 32
QUANTIZED = "quantized"
SKIPPED = "skipped"


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
    return num_params * bits, num_groups * RANGE_BITS


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

    def __init__(self, layers, other_variables, config, is_training, notes=()):
        self.layers = list(layers)
        self.other_variables = list(other_variables)
        self.config = dict(config)
        self.is_training = bool(is_training)
        self.notes = list(notes)

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
        }

    def to_json(self, indent=2):
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data):
        """Rebuild a report from `to_dict()` output; raises ValueError naming what is malformed."""
        if not isinstance(data, dict) or data.get("version") != REPORT_VERSION:
            raise ValueError("not a tfquant report of version %d (found version %r)"
                             % (REPORT_VERSION, data.get("version") if isinstance(data, dict) else None))
        try:
            layers = [LayerReport(**layer) for layer in data["layers"]]
            others = [VariableRecord(**record) for record in data["other_variables"]]
            return cls(layers, others, data["config"], data["is_training"], data.get("notes", ()))
        except (KeyError, TypeError) as exc:
            raise ValueError("tfquant report is malformed (%s); expected the fields QuantReport.to_json writes"
                             % exc)

    @classmethod
    def from_json(cls, text):
        """Rebuild a report from `to_json()` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError("tfquant report is not valid JSON (%s)" % exc)
        return cls.from_dict(data)

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
        lines.extend("note: " + note for note in self.notes)
        return "\n".join(lines)

    def __str__(self):
        return self.format_table()
