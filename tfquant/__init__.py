"""tfquant: uniform low-bit quantization of TensorFlow graphs by graph rewriting.

Public API:
  QuantConfig       validated policy: bits per layer, buckets, activation ranges.
  uniform_quantize  the quantization function on one tensor.
  quantize_graph    rewrite a tf.Graph in place; returns a QuantReport.
  QuantReport       what was quantized, what was skipped and why, and the storage it takes.
"""
from tfquant.config import QuantConfig, parse_overrides
from tfquant.ops import GroupLayout, fake_quantize, quantize_weight, uniform_quantize, weight_codes
from tfquant.quantize import quantize_graph
from tfquant.report import LayerReport, QuantReport
from tfquant.rewrite import reroute_input

__all__ = ["QuantConfig", "parse_overrides", "GroupLayout", "fake_quantize", "quantize_weight",
           "uniform_quantize", "weight_codes", "quantize_graph", "LayerReport", "QuantReport", "reroute_input"]
__version__ = "0.1.0"
