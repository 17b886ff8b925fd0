"""Export of quantized models: dense bit packing of integer codes and the packed-model container file,
the packed model of a quantized checkpoint, a frozen inference graph, TFLite float / int8 models and ONNX
Q/DQ models built from the trained ranges (fake_quant_graph, onnx_export; ONNX needs tfquant[onnx]), k-bit
weights as their codes in ONNX (onnx_kbit_export: UINT4/UINT2 + DequantizeLinear, checked in onnxruntime) and
LiteRT (tflite_int4: INT4), all from a run directory's files (checkpoint, quant_report.json,
inference_graph.meta): no model code.

Command line: python -m tfquant.export --help
"""
from tfquant.export.inference_graph import InferenceGraph, InferenceGraphError, save_inference_graph
from tfquant.export.frozen_graph import folded_weight_values, freeze_inference_graph, run_graph_def
from tfquant.export.model_export import ExportError, load_packed_weights, pack_checkpoint
from tfquant.export.packed_file import PackedFileError
from tfquant.export.run_directory import export_run_directory
from tfquant.export.tflite_export import (check_int8_compatible, convert_float, convert_int8, convert_int8_trained,
                                          measure_latency, run_tflite)

__all__ = ["ExportError", "PackedFileError", "InferenceGraph", "InferenceGraphError", "save_inference_graph",
           "export_run_directory", "pack_checkpoint", "load_packed_weights", "freeze_inference_graph",
           "run_graph_def", "check_int8_compatible", "convert_float", "convert_int8", "run_tflite",
           "measure_latency", "folded_weight_values", "convert_int8_trained"]
