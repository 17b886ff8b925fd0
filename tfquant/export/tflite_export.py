"""TFLite export of a frozen inference graph: a float model and a full-integer int8 model.

Converter: TF 2.21 still ships `tf.compat.v1.lite.TFLiteConverter`, whose `from_session` takes the
imported frozen GraphDef directly.  Interpreter: `ai_edge_litert.interpreter.Interpreter` when that
package is installed, else `tf.lite.Interpreter` (deprecated in favour of LiteRT but still working
in TF 2.21; its deprecation warning is silenced here).

int8 model choices:
  * Input and output tensors are int8 (`inference_input_type = inference_output_type = tf.int8`),
    so the model is integer end to end; `run_tflite` quantizes float images with the input
    tensor's (scale, zero_point) and dequantizes int8 logits with the output's.
  * Activation ranges come from the converter's own calibration on a representative dataset drawn
    from the training set, so the graph to convert should carry float activations (freeze it with
    quantize_activations=False).  tfquant's fake-quantization ops (Round, clip, moving-average
    conditionals) are not something the converter can fold into int8 tensors, and calibration
    yields the per-tensor scales the int8 kernels need.
  * Weights are requantized by the converter to int8 (per output channel for convolutions); the
    graph's weights are already on a grid of at most 2^8 levels per group, so only layers kept in
    float lose precision there.  A layer quantized to more than 8 bits is refused.
"""
import os
import time
import warnings

import numpy as np
import tensorflow as tf

from tfquant.config import FLOAT_BITS
from tfquant.errors import TfquantError
from tfquant.export import inference_graph, model_files
from tfquant.report import load_report

tf1 = tf.compat.v1
INT8_MAX_BITS = 8


class TfliteRunError(TfquantError, ValueError):
    """The LiteRT interpreter refused to run a converted model (the converter accepted a graph it cannot run)."""


def check_int8_compatible(report):
    """Raise ValueError naming the first quantized layer with more than 8 bits.

    Args:
      report: QuantReport (or its dict / JSON path).
    """
    report = load_report(report)
    for layer in report.quantized_layers:
        if INT8_MAX_BITS < layer.bits < FLOAT_BITS:
            name = layer.weight_variable or layer.name
            raise ValueError("int8 TFLite export needs every quantized layer at <= 8 bits; %s layer %s "
                             "uses %d bits" % (layer.kind, name, layer.bits))


def _converter(graph_def, input_shape):
    """A TF1 converter over the imported frozen graph, with the batch dimension fixed to 1."""
    graph = tf.Graph()
    with graph.as_default():
        tf1.import_graph_def(graph_def, name="")
    sess = tf1.Session(graph=graph)
    images = graph.get_tensor_by_name(inference_graph.INPUT_NAME + ":0")
    logits = graph.get_tensor_by_name(inference_graph.OUTPUT_NAME + ":0")
    shape = list(input_shape) if input_shape is not None else images.shape.as_list()
    images.set_shape([1] + [int(d) for d in shape[1:]])
    converter = tf1.lite.TFLiteConverter.from_session(sess, [images], [logits])
    return converter, sess


def convert_float(graph_def, input_shape=None):
    """Float32 TFLite model of a frozen inference graph.

    Args:
      graph_def: GraphDef with 'input' and 'logits' (frozen_graph.freeze_inference_graph).
      input_shape: [None, H, W, C]; taken from the 'input' placeholder when None.
    Returns:
      the .tflite flatbuffer as bytes.
    """
    converter, sess = _converter(graph_def, input_shape)
    try:
        return converter.convert()
    finally:
        sess.close()


def convert_int8(graph_def, representative_images, report=None, input_shape=None,
                 num_calibration=200):
    """Full-integer int8 TFLite model (int8 weights, activations, input and output).

    Args:
      graph_def: GraphDef with 'input' and 'logits', activations float (see module docstring).
      representative_images: float32 [N, H, W, C] training images, preprocessed as the model's
        input; the first num_calibration are used for calibration.
      report: QuantReport (or dict / JSON path); refused when a quantized layer has > 8 bits.
      input_shape: [None, H, W, C]; taken from the 'input' placeholder when None.
      num_calibration: number of calibration images.
    Returns:
      the .tflite flatbuffer as bytes.
    Raises:
      ValueError: a quantized layer uses more than 8 bits, or no calibration image was given.
    """
    if report is not None:
        check_int8_compatible(report)
    images = np.asarray(representative_images, dtype=np.float32)
    if images.ndim < 2 or len(images) == 0:
        raise ValueError("int8 conversion needs representative images [N, H, W, C] with N >= 1, got "
                         "shape %s" % (images.shape,))
    images = images[:num_calibration]

    def representative_dataset():
        for image in images:
            yield [image[None]]

    converter, sess = _converter(graph_def, input_shape)
    try:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        return converter.convert()
    finally:
        sess.close()


def convert_int8_trained(fake_quant_graph, input_shape=None):
    """Full-integer int8 TFLite model whose ranges are the FakeQuant ops' (no representative data set).

    Args:
      fake_quant_graph: a fake_quant_graph.FakeQuantGraph (trained weight and activation ranges).
      input_shape: [None, H, W, C]; taken from the 'input' placeholder when None.
    Returns:
      the .tflite flatbuffer as bytes (int8 input and output).
    """
    low, high = fake_quant_graph.input_range
    scale = (high - low) / 255.0
    # The input FakeQuant's grid: real = (q - zero_point) * scale with q in -128..127.
    zero_point = float(np.round(-128.0 - low / scale))
    converter, sess = _converter(fake_quant_graph.graph_def, input_shape)
    try:
        converter.inference_type = tf.int8
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        converter.quantized_input_stats = {inference_graph.INPUT_NAME: (zero_point, 1.0 / scale)}
        return converter.convert()
    finally:
        sess.close()


def make_interpreter(model, num_threads=None, default_delegates=True, preserve_all_tensors=False):
    """A LiteRT / TFLite interpreter for a model file path or flatbuffer bytes.

    Args:
      model: path of a .tflite file, or its bytes.
      num_threads: interpreter threads (None: the runtime's default).
      default_delegates: False runs the built-in kernels only, without the XNNPACK delegate the
        runtime applies by default (how runtimes without XNNPACK execute the model).
      preserve_all_tensors: keep every intermediate tensor readable after invoke (for inspection).
    Returns:
      an Interpreter (tensors not yet allocated).
    """
    kwargs = {"num_threads": num_threads}
    if preserve_all_tensors:
        kwargs["experimental_preserve_all_tensors"] = True
    where = None
    if not isinstance(model, (bytes, bytearray)):
        # A file is read and checked here (regular, not empty, a TFLite flatbuffer), never handed to the runtime
        # by name: its errors would name neither the file nor what was expected.
        where = "TFLite model %s" % os.fspath(model)
        model = model_files.read_model_file(model, "tflite")
    kwargs["model_content"] = bytes(model)
    try:
        from ai_edge_litert import interpreter as runtime  # pylint: disable=import-outside-toplevel
    except ImportError:
        runtime = None
    if not default_delegates:
        resolvers = runtime.OpResolverType if runtime is not None else tf.lite.experimental.OpResolverType
        kwargs["experimental_op_resolver_type"] = resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        if runtime is not None:
            interpreter = runtime.Interpreter(**kwargs)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                interpreter = tf.lite.Interpreter(**kwargs)
        if where is not None:
            interpreter.allocate_tensors()  # a file's tensor table is checked before anything is run through it
    except (ValueError, RuntimeError) as exc:
        if where is None:
            raise
        cause = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise model_files.ModelFileError("%s cannot be loaded by LiteRT (%s); expected a .tflite model as exported"
                                         % (where, cause)) from None
    return interpreter


def quantize_input(images, detail):
    """Images as the input tensor `detail` (an interpreter's input details) takes them: int8 codes or floats."""
    if detail["dtype"] == np.float32:
        return images.astype(np.float32)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    codes = np.round(images / scale) + zero_point
    return np.clip(codes, info.min, info.max).astype(detail["dtype"])


def _dequantize_output(values, detail):
    if detail["dtype"] == np.float32:
        return values.astype(np.float32)
    scale, zero_point = detail["quantization"]
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _run_batches(interpreter, images, batch_size):
    """Float logits of `images` through `interpreter`, resized to each chunk's batch (RuntimeError as LiteRT's)."""
    index_in = interpreter.get_input_details()[0]["index"]
    outputs, current = [], None
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if current != len(chunk):
            interpreter.resize_tensor_input(index_in, [len(chunk)] + list(chunk.shape[1:]))
            interpreter.allocate_tensors()
            current = len(chunk)
        in_detail = interpreter.get_input_details()[0]
        out_detail = interpreter.get_output_details()[0]
        interpreter.set_tensor(in_detail["index"], quantize_input(chunk, in_detail))
        interpreter.invoke()
        outputs.append(_dequantize_output(interpreter.get_tensor(out_detail["index"]), out_detail))
    return np.concatenate(outputs, axis=0)


def run_tflite(model, images, batch_size=64, num_threads=None):
    """Float logits of a TFLite model (float or int8) on images.

    The converter fixes the batch at 1 and may fold that 1 into a reshape's target (Keras 3's Dense on a 3-D
    tensor, i.e. Tensordot, feeding attention), so such a model runs at its declared batch of 1 only: when
    resizing it to `batch_size` fails, the images are run one at a time.

    Args:
      model: .tflite path or bytes.
      images: float32 [N, H, W, C], preprocessed as the frozen graph's input.
      batch_size: images per invoke.
      num_threads: interpreter threads.
    Returns:
      float32 logits [N, classes] (int8 outputs dequantized).
    Raises:
      TfliteRunError: LiteRT cannot run the model, not even one image at a time at its declared shape.
    """
    images = np.asarray(images, dtype=np.float32)
    interpreter = make_interpreter(model, num_threads)
    declared_batch = interpreter.get_input_details()[0].get("shape", [None])[0]
    try:
        return _run_batches(interpreter, images, batch_size)
    except (RuntimeError, ValueError) as exc:
        failure, size = exc, min(batch_size, len(images))
    if declared_batch == 1 and size > 1:
        try:
            # A fresh interpreter: one whose allocation failed is not reused.
            return _run_batches(make_interpreter(model, num_threads), images, 1)
        except (RuntimeError, ValueError) as exc:
            failure, size = exc, 1
    # The runtime's message is several lines (the failing node's kernel log); its first names the cause.
    cause = next((line.strip() for line in str(failure).splitlines() if line.strip()), type(failure).__name__)
    if not isinstance(model, (bytes, bytearray)):
        raise model_files.ModelFileError(
            "TFLite model %s cannot run a batch of images of shape %s (LiteRT: %s); expected a model whose "
            "input takes them" % (os.fspath(model), [size] + list(images.shape[1:]), cause)) from None
    raise TfliteRunError("the TFLite model converted from this graph cannot run a batch of %d images "
                         "(LiteRT: %s); expected a model LiteRT runs, which this graph's ops do not give: "
                         "export it without --int8 / --export_int8 (ONNX runs it)" % (size, cause)) from None


def single_image_runner(model, num_threads=1, default_delegates=True):
    """A function running one [H, W, C] image through a TFLite model at batch 1 (for latency)."""
    interpreter = make_interpreter(model, num_threads, default_delegates)
    interpreter.allocate_tensors()
    in_detail = interpreter.get_input_details()[0]
    out_index = interpreter.get_output_details()[0]["index"]

    def run(image):
        interpreter.set_tensor(in_detail["index"], quantize_input(image[None], in_detail))
        interpreter.invoke()
        return interpreter.get_tensor(out_index)
    return run


def measure_latency(models, images, repeats=3, warmup=5, num_threads=1):
    """Per-image latency of several TFLite models, measured alternately in one run.

    Each image is run through every model in turn (batch 1), so drifts of machine load hit all
    models alike; the median per model is robust to outliers.

    Args:
      models: dict label -> .tflite path or bytes, or a function running one [1, H, W, C] image
        (another runtime's model, e.g. onnx_export.single_image_runner).
      images: float32 [N, H, W, C].
      repeats: passes over the images.
      warmup: untimed images per model first.
      num_threads: interpreter threads (1 gives the steadiest numbers on a shared machine).
    Returns:
      dict label -> {'median_ms', 'mean_ms', 'count'}.
    """
    images = np.asarray(images, dtype=np.float32)
    if len(images) == 0:
        raise ValueError("latency measurement needs at least one image")
    runners = {label: model if callable(model) else single_image_runner(model, num_threads)
               for label, model in models.items()}
    for run in runners.values():
        for image in images[:warmup]:
            run(image)
    times = {label: [] for label in runners}
    labels = list(runners)
    for _ in range(repeats):
        for number, image in enumerate(images):
            # Rotating who goes first keeps cache warmth from favouring one model.
            shift = number % len(labels)
            for label in labels[shift:] + labels[:shift]:
                start = time.perf_counter()
                runners[label](image)
                times[label].append(time.perf_counter() - start)
    return {label: {"median_ms": 1e3 * float(np.median(t)), "mean_ms": 1e3 * float(np.mean(t)),
                    "count": len(t)} for label, t in times.items()}
