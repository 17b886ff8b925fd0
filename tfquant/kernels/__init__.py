"""Fused CPU kernels for the activation quantizers of training graphs, with the op chain as fallback.

A training graph's activation quantizer with a batch range ('ema' or 'batch') is, in plain ops, two
reductions (Min, Max) and an elementwise chain (Sub, Mul, Round, Mul, AddV2): seven passes over the tensor,
about a fifth of a ResNet-20 training step on a CPU. `min_max` and `quantize_in_range` compute the same
float32 values bit for bit in two passes (activation_quant.cc). They are used only where `available()`:
the library is built for this source and TensorFlow (python -m tfquant.kernels.build; tools/setup_env.sh
does it), it loads, no GPU is visible (they have CPU kernels only) and TFQ_ACTIVATION_KERNELS is not '0'.
Evaluation graphs never use them: those are the graphs that are exported, and the exporters read plain ops.
The ops have no gradient: the quantizer's gradient is ops.straight_through's, as with the op chain.
"""
import os

import tensorflow as tf

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The library's directory; tests pass others. Not the package's own: a module walker (pkgutil) would take a
# .so there for a Python extension module and fail to import it.
LIBRARY_DIR = os.path.join(PACKAGE_DIR, "lib")
LIBRARY_NAME = "activation_quant.so"
ENV_SWITCH = "TFQ_ACTIVATION_KERNELS"
MIN_MAX_TYPE = "TfquantMinMax"
QUANTIZE_TYPE = "TfquantQuantizeInRange"
# {directory: (loaded module or None, reason it is None)}; a library is loaded at most once per process.
_LOADED = {}
_GPU_VISIBLE = []


def _load(directory):
    # Imported here: `python -m tfquant.kernels.build` imports this package first, and runpy warns when the
    # package has imported the module it is about to run.
    from tfquant.kernels import build  # pylint: disable=import-outside-toplevel
    if directory not in _LOADED:
        module, reason = None, None
        try:
            if not os.path.isfile(build.library_path(directory)):
                reason = "not built (python -m tfquant.kernels.build)"
            elif not build.is_current(directory):
                reason = "built from another source or TensorFlow (python -m tfquant.kernels.build)"
            else:
                module = tf.load_op_library(build.library_path(directory))
                # Loading the same library twice (another directory) registers no new op type.
                for op_type in (MIN_MAX_TYPE, QUANTIZE_TYPE):
                    try:
                        tf.no_gradient(op_type)
                    except KeyError:
                        pass
        except (tf.errors.OpError, OSError, RuntimeError) as error:
            module, reason = None, "failed to load: %s" % str(error).strip().splitlines()[0]
        _LOADED[directory] = (module, reason)
    return _LOADED[directory]


def _gpu_visible():
    if not _GPU_VISIBLE:
        _GPU_VISIBLE.append(bool(tf.config.list_physical_devices("GPU")))
    return _GPU_VISIBLE[0]


def status(directory=LIBRARY_DIR):
    """(True, path of the library) when training graphs use the kernels, else (False, why they do not)."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False, "turned off by %s=0" % ENV_SWITCH
    if _gpu_visible():
        return False, "a GPU is visible (the kernels run on CPUs only)"
    module, reason = _load(directory)
    return (True, os.path.join(directory, LIBRARY_NAME)) if module is not None else (False, reason)


def available(directory=LIBRARY_DIR):
    """Whether training graphs built now use the fused kernels (see `status` for the reason when not)."""
    return status(directory)[0]


def _module(directory):
    module = _load(directory)[0]
    if module is None:
        raise RuntimeError("tfquant activation kernels are not available: %s" % status(directory)[1])
    return module


def min_max(x, directory=LIBRARY_DIR):
    """(tf.reduce_min(x), tf.reduce_max(x)) of a float32 tensor in one pass (both zeros: -0.0 and +0.0)."""
    return tuple(_module(directory).tfquant_min_max(x))


def quantize_in_range(x, bits, minimum, maximum, directory=LIBRARY_DIR):
    """ops.quantize_in_range(x, bits, minimum, maximum) for float32 x and scalar range, in one pass."""
    return _module(directory).tfquant_quantize_in_range(x, minimum, maximum, bits=bits)


def describe(graph):
    """One line saying how `graph`'s activation quantizers on batch ranges run: how many on the kernels, or why none."""
    fused = sum(op.type == QUANTIZE_TYPE for op in graph.get_operations())
    loaded, detail = status()
    if fused:
        return "activation quantizers: %d on the fused kernels (%s)" % (fused, detail)
    return "activation quantizers: op chain (%s)" % (
        detail if not loaded else "kernels loaded; no float32 'ema'/'batch' activation of a training graph")
