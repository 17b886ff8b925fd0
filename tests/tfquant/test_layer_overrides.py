"""Overrides that carry a layer's grid and buckets, through train, eval, pack, reload and export.

One model trained with conv1 on the symmetric grid per output channel at 4 bits, fc1 on the ternary grid with one
range, and the other layers on the config's min/max grid in split buckets at 3 bits. References: NumPy
implementations of each grid written here from the formulas (not tfquant's ops), the checkpoint's float weights,
the evaluation graph TensorFlow runs, the raw ONNX initializers and the int8 TFLite tensors."""
import json

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tests.tfquant import reference
from tests.tfquant.test_export import IMAGE_SHAPE, _save_quantized, _synthetic_data, forward
from tfquant import policy
from tfquant.config import LayerSetting, parse_overrides
from tfquant.errors import TfquantError
from tfquant.export import inference_graph, model_export, onnx_kbit, packed_reader, run_directory, tflite_export
from tfquant.layer_settings import OverrideError
from tfquant.report import config_from_report, load_report

tf1 = tf.compat.v1
ENTRIES = ["conv1/weights=4:channel:symmetric", "fc1/.*=2:ternary:none"]
SETTINGS = dict(weight_bits=3, activation_bits=8, quantize_all_layers=True, use_buckets=True, bucket_type="split",
                bucket_size=40)
# variable: (grid, bits, layout as the report records it)
EXPECTED = {"conv1/weights": ("symmetric", 4, "channel"), "conv2/weights": ("minmax", 3, "split"),
            "fc1/weights": ("ternary", 2, None), "fc2/weights": ("minmax", 3, "split")}


# -- the syntax and its errors ------------------------------------------------------------------------------------

def test_spec_syntax_and_the_old_form():
    pairs = parse_overrides("weight_overrides", ["model/conv1/.*=4:channel:symmetric", "a=b=float:lsq:split/128",
                                                 "fc/.*=8", "x=block/64", "y=binary"])
    assert pairs == [("model/conv1/.*", LayerSetting(4, "symmetric", "channel")),
                     ("a=b", LayerSetting(32, "lsq", "split", 128)), ("fc/.*", 8),
                     ("x", LayerSetting(buckets="block", bucket_size=64)), ("y", LayerSetting(grid="binary"))]
    config = tfquant.QuantConfig(weight_overrides=pairs[:3] + [("z", {"grid": "ternary", "bits": 2})])
    # A bits-only entry keeps the report form [regex, bits]; others record what they set.
    assert config.to_dict()["weight_overrides"] == [
        ["model/conv1/.*", {"bits": 4, "grid": "symmetric", "buckets": "channel"}],
        ["a=b", {"bits": 32, "grid": "lsq", "buckets": "split", "bucket_size": 128}], ["fc/.*", 8],
        ["z", {"bits": 2, "grid": "ternary"}]]
    assert tfquant.QuantConfig(**{k: v for k, v in config.to_dict().items()}).weight_overrides == \
        config.weight_overrides


@pytest.mark.parametrize("entry,message", [
    ("conv1=4:chanel", "weight_overrides entry 'conv1=4:chanel' is not valid; expected the bits after '='"),
    ("conv1=4:5", "weight_overrides entry 'conv1=4:5' is not valid: it sets bits twice"),
    ("conv1=4:ternary", r"weight_overrides entry 'conv1=4:ternary' is not valid: the ternary grid takes 2 bits"),
    ("conv1=block/24", "weight_overrides entry 'conv1=block/24' is not valid: block size 24; expected a power of 2"),
    ("conv1=channel/8", "weight_overrides entry 'conv1=channel/8' is not valid; expected the bits after '='"),
    ("conv1=17:lsq", r"weight_overrides\['conv1'\]=17 is not a valid bit width"),
    ("conv(=4:channel", "weight_overrides regex 'conv\\(' is not valid"),
])
def test_bad_entries_are_one_error_naming_the_entry(entry, message):
    with pytest.raises(OverrideError, match=message) as info:
        tfquant.QuantConfig(weight_overrides=parse_overrides("weight_overrides", [entry]))
    assert isinstance(info.value, TfquantError) and "\n" not in str(info.value)


def test_bad_settings_given_through_the_library():
    with pytest.raises(OverrideError, match="weight_overrides entry 'a' sets unknown range"):
        tfquant.QuantConfig(weight_overrides=[("a", {"range": "lsq"})])
    with pytest.raises(OverrideError, match="activation overrides set bits only"):
        tfquant.QuantConfig(activation_overrides=[("relu", LayerSetting(8, "symmetric"))])
    with pytest.raises(OverrideError, match="block/N with N a power of 2"):
        tfquant.QuantConfig(bucket_size=40, weight_overrides=[("a", LayerSetting(buckets="block"))])


def test_policy_refuses_an_unmatched_setting_and_a_width_the_grid_lacks():
    layers = [("conv1/Conv2D", "conv1/weights"), ("fc/MatMul", "fc/weights")]
    config = tfquant.QuantConfig(weight_overrides=[("fc/weights", 8), ("nothing/.*", LayerSetting(grid="lsq"))])
    with pytest.raises(OverrideError, match=r"entry 'nothing/\.\*=lsq' applies to no layer"):
        policy.decide_bits(layers, [], config)
    # bits-only entries that match nothing stay a note, as before
    plan = policy.decide_bits(layers, [], tfquant.QuantConfig(weight_overrides=[("nothing", 2)]))
    assert plan.unused_weight_overrides == ["nothing"]
    # the grid set by the override, the bits by weight_bits: 4 bits on the ternary grid is refused up front
    config = tfquant.QuantConfig(quantize_all_layers=True, weight_overrides=[("fc/.*", LayerSetting(grid="ternary"))])
    with pytest.raises(OverrideError, match=r"'fc/\.\*=ternary' \(layer fc/MatMul, bits from weight_bits\) is not "
                                            "valid: the ternary grid takes 2 bits, this layer gets 4"):
        policy.decide_bits(layers, [], config)
    # first match wins: fc/weights takes the first entry's grid and buckets and the config's bits
    config = tfquant.QuantConfig(quantize_all_layers=True, weight_overrides=[
        ("fc/.*", LayerSetting(grid="symmetric", buckets="none")), ("conv1/.*|fc/weights", LayerSetting(2, "lsq"))])
    plan = policy.decide_bits(layers, [], config)
    fc, conv = plan.decision("fc/MatMul"), plan.decision("conv1/Conv2D")
    assert (fc.bits, fc.grid, fc.setting.buckets, fc.setting_source) == (4, "symmetric", "none", "override 'fc/.*'")
    assert (conv.bits, conv.grid, conv.setting.buckets) == (2, "lsq", None)
    # an entry every match of which an earlier entry takes applies to nothing: refused
    config = tfquant.QuantConfig(weight_overrides=[("fc/.*", 8), ("fc/weights", LayerSetting(2, "ternary"))])
    with pytest.raises(OverrideError, match="'fc/weights=2:ternary' applies to no layer"):
        policy.decide_bits(layers, [], config)


# -- the chain -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory of the mixed model trained 3 steps, exported with --onnx --int8."""
    directory = tmp_path_factory.mktemp("mixed")
    config = tfquant.QuantConfig(weight_overrides=parse_overrides("weight_overrides", ENTRIES), **SETTINGS)
    checkpoint, report_path = _save_quantized(str(directory), config, np.random.default_rng(5), train_steps=3)
    inference_graph.save_inference_graph(str(directory), forward, [None] + IMAGE_SHAPE)
    images, labels = _synthetic_data(np.random.default_rng(11), 48)
    calibration, _ = _synthetic_data(np.random.default_rng(12), 16)
    result = run_directory.export_run_directory(str(directory), str(directory / "export"), onnx=True, int8=True,
                                                test_data=(images, labels), calibration_images=calibration,
                                                latency_images=0)
    reader = tf.train.load_checkpoint(checkpoint)
    shadows = {name: reader.get_tensor(name) for name in EXPECTED}
    return dict(dir=directory, config=config, checkpoint=checkpoint, report=load_report(report_path),
                result=result, shadows=shadows, images=images)


def _symmetric_reference(w, bits):
    """(unsigned codes, step per output channel) of the narrow symmetric grid, last axis the channels."""
    level = np.float32(2 ** (bits - 1) - 1)
    amax = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
    step = np.maximum(amax / level, np.float32(1e-10)).astype(np.float32)
    return (np.round(np.clip(w / step, -level, level)) + level).astype(np.int64), step


def _ternary_reference(w):
    """(codes 0/1/2, mask of elements too near the threshold for float32 sums to decide) of TWN's grid."""
    magnitude = np.abs(w.astype(np.float64))
    threshold = 0.7 * magnitude.mean()
    codes = (np.sign(w) * (magnitude > threshold) + 1).astype(np.int64)
    return codes, np.abs(magnitude - threshold) <= 1e-5 * threshold


def _minmax_split_bounds(w, bits, size):
    """(lowest, highest) code each element may get on the min/max grid of `size`-element buckets (ties aside)."""
    lower, upper = np.zeros(w.size, np.int64), np.zeros(w.size, np.int64)
    for group in reference.group_indices(w.shape, "split", bucket_size=size):
        low, high, _, _ = reference.grid_codes(w.reshape(-1)[group], bits)
        lower[group], upper[group] = low, high
    return lower.reshape(w.shape), upper.reshape(w.shape)


def _check_codes(name, codes, w):
    grid, bits, _ = EXPECTED[name]
    if grid == "symmetric":
        np.testing.assert_array_equal(codes, _symmetric_reference(w, bits)[0])
    elif grid == "ternary":
        want, doubtful = _ternary_reference(w)
        assert doubtful.sum() <= 2
        np.testing.assert_array_equal(codes[~doubtful], want[~doubtful])
    else:
        lower, upper = _minmax_split_bounds(w, bits, SETTINGS["bucket_size"])
        assert np.all((codes >= lower) & (codes <= upper)) and np.mean(lower == upper) > 0.99


def test_report_records_each_layers_grid_layout_and_rule(run):
    layers = {layer.weight_variable: layer for layer in run["report"].weight_layers}
    for name, (grid, bits, bucket_type) in EXPECTED.items():
        layer = layers[name]
        assert (layer.weight_grid, layer.bits, layer.bucket_type) == (grid, bits, bucket_type)
    assert layers["conv1/weights"].setting_source == "override 'conv1/weights'"
    assert layers["fc1/weights"].setting_source == "override 'fc1/.*'" and layers["fc1/weights"].num_groups == 1
    assert layers["conv1/weights"].num_groups == 8 and layers["conv2/weights"].bucket_size == 40
    assert layers["conv2/weights"].setting_source is None
    table = run["report"].format_table()
    assert "quantized (symmetric grid, buckets channel: override 'conv1/weights')" in table
    assert "quantized (ternary grid, buckets -: override 'fc1/.*')" in table
    # the replayed config rebuilds the same per-layer settings from literal names only
    replay = config_from_report(run["report"])
    assert [regex.pattern for regex, _ in replay.weight_overrides] == ["conv1/weights", "fc1/weights"]


def test_packed_codes_match_numpy_and_reload_matches_eval_graph(run):
    stored = {t.name: t for t in packed_reader.read_packed_model(str(run["dir"] / "export" / "model.tfq"))[0]
              if hasattr(t, "codes")}
    reloaded, _ = model_export.load_packed_weights(str(run["dir"] / "export" / "model.tfq"))
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None] + IMAGE_SHAPE)
        forward(x)
        report = tfquant.quantize_graph(graph, run["config"], is_training=False)
        read = {layer.weight_variable: graph.get_operation_by_name(layer.name).inputs[layer.input_index]
                for layer in report.weight_layers if layer.quantized}
        with new_session(graph) as sess:
            tf1.train.Saver().restore(sess, run["checkpoint"])
            evaluated = sess.run(read)
    for name, (grid, bits, bucket_type) in EXPECTED.items():
        tensor, w = stored[name], run["shadows"][name]
        assert (tensor.bits, tensor.layout) == (bits, bucket_type or "none")
        _check_codes(name, np.asarray(tensor.codes, np.int64), w)
        if grid == "symmetric":
            _, step = _symmetric_reference(w, bits)
            # within 2 ulps: TensorFlow may divide by 7 as a multiplication by its reciprocal
            np.testing.assert_allclose(tensor.alpha, step * np.float32(2 ** bits - 1), rtol=2.5e-7, atol=0)
        # NumPy's decoding of the stored codes is the reloaded weight is the evaluation graph's, bit for bit
        groups = reference.group_indices(w.shape, bucket_type or "none", (3,) if w.ndim == 4 else (1,), 40)
        decoded = np.zeros(w.size, np.float32)
        scale = np.asarray(tensor.alpha, np.float32) * np.float32(1.0 / (2 ** bits - 1))
        for index, group in enumerate(groups):
            decoded[group] = (np.asarray(tensor.codes).reshape(-1)[group].astype(np.float32) * scale[index]
                              + np.asarray(tensor.beta, np.float32)[index])
        assert np.array_equal(decoded.reshape(w.shape).view(np.uint32), reloaded[name].view(np.uint32)), name
        assert np.array_equal(reloaded[name].view(np.uint32), evaluated[name].view(np.uint32)), name


def test_exports_keep_each_layers_grid(run):
    result, export = run["result"], run["dir"] / "export"
    assert result["agreement_with_quantized_tf"] == {"frozen_graph": 1.0, "tflite_float": 1.0, "tflite_int8": 1.0,
                                                     "onnx": 1.0}
    # ONNX: every layer's k-bit initializer holds its own grid's codes
    codes = onnx_kbit.read_weight_codes((export / "model.onnx").read_bytes())
    assert set(codes) == set(EXPECTED)
    for name, value in codes.items():
        _check_codes(name, value, run["shadows"][name])
    # int8 TFLite: conv1 keeps its 4-bit symmetric per-channel grid (its int8 values are the signed NumPy codes);
    # the other layers name why they were put on an 8-bit grid
    records = {r["layer"]: r for r in result["trained_ranges"]["weights"]}
    assert (records["conv1/Conv2D"]["int8"], records["conv1/Conv2D"]["bits"]) == ("exact", 4)
    assert records["fc1/MatMul"]["reason"] == "ternary grid" and records["conv2/Conv2D"]["reason"] == "asymmetric grid"
    interpreter = tflite_export.make_interpreter(str(export / "model_int8.tflite"))
    interpreter.allocate_tensors()
    detail = next(d for d in interpreter.get_tensor_details() if d["name"] == records["conv1/Conv2D"]["tensor"]
                  or "conv1/Conv2D/weight_fake_quant" in d["name"] and d["dtype"] == np.int8)
    stored = interpreter.get_tensor(detail["index"])
    signed, step = _symmetric_reference(run["shadows"]["conv1/weights"], 4)
    np.testing.assert_array_equal(stored, (signed - 7).transpose(3, 0, 1, 2))
    # (its scales are the steps times the batch norm's gamma / sigma, which the converter folds into the kernel)
    assert detail["quantization_parameters"]["scales"].shape == step.shape
    assert "layer conv2/Conv2D: the minmax grid" in result["int4"]["not_written"]


def test_a_report_without_per_layer_grids_reads_with_the_configs_grid(run):
    data = json.loads(run["report"].to_json())
    data["config"]["weight_overrides"] = []
    data["config"]["weight_scheme"] = "symmetric"
    for layer in data["layers"]:
        layer.pop("weight_grid", None)
        layer.pop("setting_source", None)
    old = tfquant.QuantReport.from_dict(data)
    assert {layer.weight_grid for layer in old.weight_layers if layer.quantized} == {"symmetric"}
