"""MobileNetV2 on Fashion-MNIST: the builder's 'small' stem, and nets/mobilenet_at_fmnist_run.py end to end on a
tiny subset with the W4A4 recipe (LSQ, LSQ+ offsets on signed layer outputs, per-channel depthwise ranges)."""
import json
import math
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from nets import mobilenet
from nets.data import fmnist

tf1 = tf.compat.v1
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_fmnist = pytest.mark.skipif(not os.path.isdir(fmnist.DEFAULT_DATA_DIR), reason="no Fashion-MNIST copy")


def _last_feature_map(version, stem, size=28):
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None, size, size, 1])
        mobilenet.forward_mobilenet(images, False, version, 0.35, 10, stem=stem)
        pooled = [op for op in graph.get_operations() if op.type == "Mean"]
        return pooled[-1].inputs[0].shape.as_list()[1:3]


@pytest.mark.parametrize("version", [1, 2])
def test_small_stem_divides_by_8_and_imagenet_stem_by_32(version):
    # 'SAME' padding: a stride-s stage maps n to ceil(n / s); the small stem keeps 3 of the 5 stride-2 stages.
    assert _last_feature_map(version, "small") == [math.ceil(28 / 8)] * 2
    assert _last_feature_map(version, "imagenet") == [math.ceil(28 / 32)] * 2
    assert _last_feature_map(version, "small", 32) == [4, 4]


def test_unknown_stem_is_refused():
    with tf.Graph().as_default():
        with pytest.raises(ValueError, match="stem 'cifar' is not supported"):
            mobilenet.forward_mobilenet(tf1.placeholder(tf.float32, [None, 28, 28, 1]), False, 2, 1.0, 10,
                                        stem="cifar")


# The recipe's activation side (LSQ+ offsets on signed outputs) with min/max weights: LSQ weights' step search at
# the first step would add two minutes of CPU to the suite (their grid is tested elsewhere).
RECIPE = ["--uql_weight_bits=4", "--uql_activation_bits=4", "--uql_quantize_layer_outputs",
          "--uql_act_range=lsq", "--uql_freeze_oscillations=0.02"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not os.path.isdir(fmnist.DEFAULT_DATA_DIR):
        pytest.skip("no Fashion-MNIST copy")
    if os.environ.get("TFQ_SLOW_TESTS") != "1":
        # Minutes of CPU for the first quantized step of a 150-tensor graph: past the suite's budget. The
        # MobileNet builder and the run-script path are run end to end by tests/nets/test_ilsvrc12_scripts.py.
        pytest.skip("the MobileNetV2 Fashion-MNIST run takes minutes here; TFQ_SLOW_TESTS=1 runs it")
    work = tmp_path_factory.mktemp("mnv2")
    argv = [sys.executable, os.path.join(ROOT, "nets", "mobilenet_at_fmnist_run.py"), "--learner=uniform",
            "--save_path=%s/float/model.ckpt" % work, "--uql_save_quant_model_path=%s/q/model.ckpt" % work,
            "--log_dir=%s/logs" % work, "--train_subset=32", "--eval_subset=40", "--batch_size=16",
            "--batch_size_eval=20", "--nb_epochs_rat=0.1", "--uql_quant_epochs=1", "--summ_step=1",
            "--mobilenet_depth_mult=0.35", "--uql_analysis_batches=1"] + RECIPE
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(work, "q", "results.json")) as handle:
        results = json.load(handle)
    with open(results["report"]) as handle:
        report = json.load(handle)
    return work, done.stdout, results, report


@needs_fmnist
def test_script_trains_and_evaluates_mobilenet_v2(tiny_run):
    work, stdout, results, _ = tiny_run
    # Float training ran 2 steps (0.1 x 10 epochs x 32 images / 16), fine-tuning 2 (1 epoch), both logged.
    assert "full-prec iter 2/2" in stdout
    assert results["test_examples"] == 40
    for key in ("float_accuracy", "quant_accuracy"):
        # An accuracy over 40 images is a multiple of 1/40.
        assert 0.0 <= results[key] <= 1.0 and abs(results[key] * 40 - round(results[key] * 40)) < 1e-4
    # v2 by default (the script's default): the checkpoint holds the 17 inverted-residual blocks' depthwise kernels.
    reader = tf1.train.load_checkpoint(os.path.join(work, "float"))
    kernels = {name: shape for name, shape in reader.get_variable_to_shape_map().items()
               if name.endswith("depthwise/depthwise_kernel")}
    assert len(kernels) == sum(stage[2] for stage in mobilenet.V2_STAGES) == 17


@needs_fmnist
def test_report_gives_each_depthwise_layer_one_range_per_channel(tiny_run):
    work, _, _, report = tiny_run
    reader = tf1.train.load_checkpoint(os.path.join(work, "float"))
    shapes = reader.get_variable_to_shape_map()
    depthwise = [layer for layer in report["layers"] if layer["op_type"] == "DepthwiseConv2dNative"]
    assert len(depthwise) == 17
    for layer in depthwise:
        assert layer["status"] == "quantized" and layer["bits"] == 4
        # [k, k, channels, 1]: one range group per channel, from the checkpoint's own shape.
        assert layer["num_groups"] == shapes[layer["weight_variable"]][2]
    assert report["config"]["use_buckets"] and report["config"]["bucket_type"] == "channel"


@needs_fmnist
def test_signed_layer_outputs_get_lsq_plus_offsets(tiny_run):
    _, _, results, report = tiny_run
    activations = [layer for layer in report["layers"] if layer["kind"] == "activation" and layer["status"] == "quantized"]
    by_type = {}
    for layer in activations:
        by_type.setdefault(layer["op_type"], []).append(layer)
    # Linear bottleneck outputs and residual sums can be negative: a learned step and offset; ReLU6 outputs a step.
    assert by_type["LayerOutput"] and by_type["AddV2"]
    for layer in by_type["LayerOutput"] + by_type["AddV2"]:
        assert [v.rsplit("/", 1)[1] for v in layer["range_variables"]] == ["lsq_step", "lsq_offset"]
    for layer in by_type["Relu6"]:
        assert [v.rsplit("/", 1)[1] for v in layer["range_variables"]] == ["lsq_step"]
    assert "oscillation" in results and results["oscillation"]["weights"] > 0


def test_layer_outputs_take_lsq_or_ema_ranges_only():
    from tfquant.config import QuantConfig
    assert QuantConfig(activation_bits=4, act_range="lsq", quantize_layer_outputs=True).act_range == "lsq"
    for refused in ("pact", "batch"):
        with pytest.raises(ValueError, match="quantize_layer_outputs=True is not valid with act_range='%s'" % refused):
            QuantConfig(activation_bits=4, act_range=refused, quantize_layer_outputs=True)
