"""Learners: algorithms that drive any ModelHelper (full precision, uniform quantization)."""
import os


def import_tensorflow_quietly():
    """Import TensorFlow with its C++ start-up chatter (CUDA probing on a CPU machine) kept off stderr.

    Run scripts promise one clear line for a user error; TensorFlow's import and first session otherwise
    print four or five.
    Errors raised by the import itself still reach stderr: it is restored before they propagate.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # oneDNN kernels roughly halve conv backprop time on this class of CPU (see nets/__init__.py);
    # TensorFlow reads the variable only at import.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        tensorflow.compat.v1  # pylint: disable=pointless-statement  (forces its lazy loading now)
        # Probing devices once here keeps the CUDA driver's "failed call to cuInit" off the first session.
        tensorflow.config.list_physical_devices("GPU")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
