"""Packaging for tfquant: the graph-rewriting quantizer, its learners and model helpers."""
from setuptools import find_packages, setup

setup(
    name="tfquant",
    version="0.1.0",
    description="Uniform low-bit quantization of TensorFlow graphs by graph rewriting",
    packages=find_packages(include=["tfquant", "tfquant.*", "learners", "learners.*", "nets", "nets.*"]),
    # The activation kernels' source, compiled on the installing machine (python -m tfquant.kernels.build).
    package_data={"tfquant.kernels": ["*.cc"]},
    python_requires=">=3.9",
    # tf-keras (the legacy Keras, for nets/keras_model_run.py) must match the TensorFlow release.
    install_requires=["tensorflow>=2.15", "numpy", "absl-py", "tensorboard", "tf-keras~=2.21.0"],
    # ONNX export (python -m tfquant.export --onnx); they install from wheels without touching TensorFlow.
    # k-bit weights need onnx's opset 25 (UINT2; UINT4 and blocked DequantizeLinear from opset 21, onnx 1.20
    # writes 25), an onnxruntime that runs 2-bit DequantizeLinear and MatMulNBits (checked with 1.32) and
    # ml_dtypes' int2/int4 arrays; LiteRT INT4 files are run by ai-edge-litert.
    # pytest-xdist 3.8 has --no-loadscope-reorder, which run_tests.sh passes.
    extras_require={"onnx": ["tf2onnx==1.17.0", "onnx>=1.20", "onnxruntime>=1.32", "ml_dtypes>=0.5"],
                    "litert": ["ai-edge-litert>=2.3"],
                    "test": ["pytest", "pytest-xdist>=3.8", "hypothesis", "tf2onnx==1.17.0", "onnx>=1.20",
                             "onnxruntime>=1.32", "ml_dtypes>=0.5", "ai-edge-litert>=2.3"]},
)
