"""The onnxruntime CPU session tfquant runs its ONNX files in, and tells users to deploy them with.

One place for the session options, so that the export check, `run_onnx` and the benchmarks run a file the way
a user is told to. What the options are and why (measured on the MLP 784-2048-2048-10 at W4 block/32,
onnxruntime 1.32; BENCHMARKS.md, section "k-bit files"):

- `session.qdq_matmulnbits_accuracy_level=0`: MatMulNBits keeps its activations float; its default level
  quantizes them to 8 bits and changes the results.
- Graph optimizations at ORT_ENABLE_EXTENDED or above (ALL here): there the DequantizeLinear -> MatMul pairs of
  a blocked k-bit weight fuse into MatMulNBits; at ORT_ENABLE_BASIC the DequantizeLinear nodes stay and write
  the float weights on every run into buffers the memory arena keeps (27 MB for the MLP, more than its float
  model's 23 MB).
- Prepacking stays on (onnxruntime's default): MatMulNBits then holds its weights in the kernel's packed 4-bit
  form; with `session.disable_prepacking=1` it dequantizes them into a float buffer during every run (an 11 MB
  higher peak for the MLP, which glibc's heap keeps: 42 MB instead of 21 MB added).
- The model is loaded from its path: handing onnxruntime the file's bytes keeps a second copy alive during
  loading (+3.7 MB for the k-bit MLP).
- The CPU memory arena (on or off, or an environment arena growing by what is asked), memory patterns, the
  number of threads and environment allocators change the model's own memory by less than 0.3 MB at batch 1 (the
  activations are a few KB), so onnxruntime's defaults stay.
"""
import os

# Session config entries that change what a session computes or holds (recorded in export.json).
CONFIG_ENTRIES = {"session.qdq_matmulnbits_accuracy_level": "0"}


def _ort():
    import onnxruntime  # pylint: disable=import-outside-toplevel
    return onnxruntime


def session_options(threads=0, optimize=True, optimized_path=None):
    """The onnxruntime SessionOptions tfquant runs ONNX files with.

    Args:
      threads: intra-op threads (0: onnxruntime's default, every core); with threads, one inter-op thread.
      optimize: every graph optimization (MatMulNBits fusion, at accuracy level 0) or none at all.
      optimized_path: where onnxruntime writes the model it optimized (None: not written).
    Returns:
      onnxruntime.SessionOptions.
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its shape-merging warnings would break one-line outputs
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for key, value in CONFIG_ENTRIES.items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return options


def create(model, threads=0, optimize=True, optimized_path=None):
    """An onnxruntime CPU session of a model, loaded from its path when it has one.

    Args:
      model: an .onnx file's path, or a serialized model (bytes).
      threads, optimize, optimized_path: as session_options.
    Returns:
      onnxruntime.InferenceSession.
    """
    source = bytes(model) if isinstance(model, (bytes, bytearray, memoryview)) else os.fspath(model)
    return _ort().InferenceSession(source, sess_options=session_options(threads, optimize, optimized_path),
                                   providers=["CPUExecutionProvider"])


def describe():
    """The session settings for export.json: {'config', 'graph_optimization_level', 'load', 'prepacking'}."""
    return {"config": dict(CONFIG_ENTRIES), "graph_optimization_level": "ORT_ENABLE_ALL", "load": "from the path",
            "prepacking": "on (onnxruntime's default)"}
