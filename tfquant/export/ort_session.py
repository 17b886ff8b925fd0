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
- Deploying the model onnxruntime optimized (`optimized_path`) with its initializers in a file beside it
  (`external_min_bytes`) holds the least: onnxruntime maps that file, packs the weights from it and drops the
  pages, and nothing is fused at load (no transient copies). Fresh process, RSS added (anonymous + file-backed):
  k-bit MLP 13.9 MB (4.1 + 9.7) against 20.7 MB (11.5 + 9.2) for model.onnx; float 32.2 MB (23.6 + 8.6) against
  50.7-66.7 MB. Outputs are bit-identical to the source file's. onnxruntime's first session alone (a one-Relu
  model) adds 9.5 MB (1.3 + 8.2: its library code paged in), which no session option removes, so k-bit / float
  stays about 0.43 in a fresh process (0.20 after a first session: 4.5 against 22.8 MB).
- Not used: the ORT format (`session.save_model_format=ORT`) loaded from its path copies the flatbuffer's
  initializers (k-bit 22.1 MB, float 92.3 MB); loaded from bytes with `session.use_ort_model_bytes_directly=1`
  and `session.use_ort_model_bytes_for_initializers=1`, the Python binding's copy of the bytes is freed after
  the session is made while the initializers still point into it: the outputs were NaN.
"""
import os

# The suffix of an optimized model's external initializer file (external_data_path).
EXTERNAL_DATA_SUFFIX = ".data"
# Session config entries that change what a session computes or holds (recorded in export.json).
CONFIG_ENTRIES = {"session.qdq_matmulnbits_accuracy_level": "0"}


def _ort():
    import onnxruntime  # pylint: disable=import-outside-toplevel
    return onnxruntime


def external_data_path(optimized_path):
    """The file beside an optimized model that holds its initializers when they are written apart."""
    return os.fspath(optimized_path) + EXTERNAL_DATA_SUFFIX


def session_options(threads=0, optimize=True, optimized_path=None, external_min_bytes=None):
    """The onnxruntime SessionOptions tfquant runs ONNX files with.

    Args:
      threads: intra-op threads (0: onnxruntime's default, every core); with threads, one inter-op thread.
      optimize: every graph optimization (MatMulNBits fusion, at accuracy level 0) or none at all.
      optimized_path: where onnxruntime writes the model it optimized (None: not written).
      external_min_bytes: with optimized_path, initializers of at least this many bytes are written to
        external_data_path(optimized_path) instead (None: every initializer inside the model).
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
        options.optimized_model_filepath = os.fspath(optimized_path)
        if external_min_bytes is not None:
            # The name is relative to the optimized model's directory, where onnxruntime looks for it on loading.
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             os.path.basename(external_data_path(optimized_path)))
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             str(int(external_min_bytes)))
    return options


def create(model, threads=0, optimize=True, optimized_path=None, external_min_bytes=None):
    """An onnxruntime CPU session of a model, loaded from its path when it has one.

    Args:
      model: an .onnx file's path, or a serialized model (bytes).
      threads, optimize, optimized_path, external_min_bytes: as session_options.
    Returns:
      onnxruntime.InferenceSession.
    """
    source = bytes(model) if isinstance(model, (bytes, bytearray, memoryview)) else os.fspath(model)
    options = session_options(threads, optimize, optimized_path, external_min_bytes)
    return _ort().InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def describe():
    """The session settings for export.json: {'config', 'graph_optimization_level', 'load', 'prepacking'}."""
    return {"config": dict(CONFIG_ENTRIES), "graph_optimization_level": "ORT_ENABLE_ALL", "load": "from the path",
            "prepacking": "on (onnxruntime's default)"}
