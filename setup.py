"""Packaging for tfquant: the graph-rewriting quantizer, its learners and model helpers."""
from setuptools import find_packages, setup

setup(
    name="tfquant",
    version="0.1.0",
    description="Uniform low-bit quantization of TensorFlow graphs by graph rewriting",
    packages=find_packages(include=["tfquant", "tfquant.*", "learners", "learners.*", "nets", "nets.*"]),
    python_requires=">=3.9",
    # tf-keras (the legacy Keras, for nets/keras_model_run.py) must match the TensorFlow release.
    install_requires=["tensorflow>=2.15", "numpy", "absl-py", "tensorboard", "tf-keras~=2.21.0"],
    # ONNX export (python -m tfquant.export --onnx); both install from wheels without touching TensorFlow.
    extras_require={"onnx": ["tf2onnx==1.17.0", "onnxruntime"],
                    "test": ["pytest", "pytest-xdist", "hypothesis", "tf2onnx==1.17.0", "onnxruntime"]},
)
