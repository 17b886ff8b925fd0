"""tfquant: uniform low-bit quantization of TensorFlow graphs by graph rewriting.

Public API:
  QuantConfig       validated policy: bits per layer, buckets, activation ranges.
  uniform_quantize  the quantization function on one tensor.
  quantize_graph    rewrite a tf.Graph in place; returns a QuantReport.
  QuantReport       what was quantized, what was skipped and why, and the storage it takes.
  TfquantError      the base of every error a user can cause (a file, setting, checkpoint or report).
"""
import os as _os
import sys as _sys

if _sys.argv[:1] == ["-m"]:
    # `python -m tfquant.export` on a run directory another process holds stops here, before TensorFlow's import.
    from tfquant import export_command as _export_command
    _export_command.hold_checkpoint_dir_early()

if _sys.argv[:1] == ["-m"] and "tensorflow" not in _sys.modules:
    # `python -m tfquant.export` imports this package before the command's own code runs (argv[0] is
    # "-m" only while Python locates the module), so this is the one place to keep TensorFlow's C++
    # start-up lines (CUDA probing on a CPU-only machine) off a command that promises one "error:" line.
    # TF_CPP_MIN_LOG_LEVEL alone does not reach them: they are logged before absl is initialised.
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _saved_stderr, _null = _os.dup(2), _os.open(_os.devnull, _os.O_WRONLY)
    _os.dup2(_null, 2)
    try:
        import tensorflow as _tensorflow
        _tensorflow.config.list_physical_devices("GPU")  # the CUDA driver's complaint comes here, once
    finally:  # an import error still reaches stderr: it propagates after stderr is back
        _os.dup2(_saved_stderr, 2)
        _os.close(_saved_stderr)
        _os.close(_null)

if _sys.argv[:1] == ["-m"]:
    import warnings as _warnings
    # `python -m tfquant.report` runs report.py as __main__ after this package imported it as tfquant.report,
    # which runpy warns about; its __main__ block only calls tfquant.report_cli, so nothing runs twice.
    _warnings.filterwarnings("ignore", message="'tfquant.report' found in sys.modules", category=RuntimeWarning)

# The public names are imported on first use (PEP 562), so that `import tfquant.files` - the run directory's
# lock, which a run script takes before TensorFlow is imported - does not import TensorFlow.
_PUBLIC = {"QuantConfig": "config", "parse_overrides": "config", "TfquantError": "errors", "GroupLayout": "layout",
           "quantize_weight": "ops", "uniform_quantize": "ops", "weight_codes": "ops",
           "quantize_graph": "quantize", "LayerReport": "report", "QuantReport": "report", "reroute_input": "rewrite"}
__all__ = list(_PUBLIC)


def __getattr__(name):
    import importlib
    if name in _PUBLIC:
        value = getattr(importlib.import_module("tfquant." + _PUBLIC[name]), name)
    elif not name.startswith("__"):
        try:  # `import tfquant` then `tfquant.ops`: a submodule, as the eager imports used to provide
            value = importlib.import_module("tfquant." + name)
        except ModuleNotFoundError as exc:
            if exc.name != "tfquant." + name:
                raise
            raise AttributeError("module 'tfquant' has no attribute %r" % name) from None
    else:
        raise AttributeError("module 'tfquant' has no attribute %r" % name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


__version__ = "0.1.0"
