"""Both ILSVRC-12 run scripts end to end on tiny generated images: train, eval, export; report contents."""
import json
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf

import tfquant
from tools import make_ilsvrc12_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--image_size=32", "--batch_size=8", "--batch_size_eval=16", "--nb_epochs_rat=0.0025",
        "--uql_quant_epochs=0.25", "--summ_step=2"]


def run_script(script, args, cwd):
    """Run nets/<script> in `cwd`; returns the CompletedProcess (text output)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "nets", script)] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("records"))
    make_ilsvrc12_records.make_records(directory, nb_train=32, nb_eval=17, nb_files=2, min_size=24, max_size=48,
                                       bboxes=True, corrupt_eval=1, seed=2)
    return directory


def _run_phases(script, extra, cwd, data_dir, eval_mode):
    """Train (float, then quantized), optionally --exec_mode eval, then export; returns their stdouts."""
    args = ["--learner=uniform", "--data_dir_local=" + data_dir] + TINY + extra
    phases = [[], ["--exec_mode=eval"]] if eval_mode else [[]]
    outputs = []
    for phase in phases + [["--exec_mode=export", "--export_dir=export"]]:
        result = run_script(script, args + phase, cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout)
    return outputs[0], outputs[1] if eval_mode else None, outputs[-1]


def _check_outputs(cwd, trained, evaluated, exported):
    results = json.load(open(os.path.join(cwd, "models_uql", "results.json")))
    # 17 validation records, one corrupt JPEG skipped (and said so), never a crash.
    assert results["test_examples"] == 16 and results["dataset"] == "ilsvrc_12"
    assert "record 0 is not a decodable JPEG with a label; skipped" in trained
    top = re.findall(r"top-1 accuracy ([0-9.]+) \| top-5 accuracy ([0-9.]+) \| 16 test images", trained)
    assert len(top) == 2 and all(float(t1) <= float(t5) for t1, t5 in top)
    assert float(top[1][0]) == pytest.approx(results["quant_accuracy"], abs=1e-4)
    # Top-5 recorded as measured (the metric itself is checked against NumPy in test_ilsvrc12_pipeline): float first.
    assert results["float_top5_accuracy"] == pytest.approx(float(top[0][1]), abs=1e-4)
    assert results["quant_top5_accuracy"] == pytest.approx(float(top[1][1]), abs=1e-4)
    accuracy = results["quant_accuracy"]
    if evaluated is not None:
        assert float(re.search(r"uniform eval: accuracy ([0-9.]+) \| loss [0-9.]+ \| 16 test images",
                               evaluated).group(1)) == pytest.approx(accuracy, abs=1e-4)
    assert float(re.search(r"accuracy quantized_checkpoint\s+([0-9.]+)", exported).group(1)) == pytest.approx(
        accuracy, abs=1e-4)
    assert float(re.search(r"accuracy frozen_graph\s+([0-9.]+)", exported).group(1)) == pytest.approx(
        accuracy, abs=1e-4)
    assert os.path.getsize(os.path.join(cwd, "export", "model.tfq")) > 0
    return json.load(open(os.path.join(cwd, "models_uql", "quant_report.json")))


def test_resnet18_script(tmp_path, data_dir):
    trained, evaluated, exported = _run_phases("resnet_at_ilsvrc12_run.py", [], str(tmp_path), data_dir, False)
    report = _check_outputs(str(tmp_path), trained, evaluated, exported)
    weights = [layer for layer in report["layers"] if layer["kind"] == "weight"]
    # ResNet-18: 7x7 stem, 16 convs in 8 basic blocks, 3 projection shortcuts, fc over 1001 classes.
    assert [layer["op_type"] for layer in weights] == ["Conv2D"] * 20 + ["MatMul"]
    assert weights[-1]["shape"] == [512, 1001]
    assert all(layer["status"] == "quantized" and layer["bits"] == 4 for layer in weights[1:-1])
    # No --resnet_size given: the script's default is PocketFlow's ResNet-18, not the CIFAR scripts' 20.
    recorded = json.load(open(tmp_path / "models" / "model.ckpt.settings.json"))["settings"]
    assert recorded["model"] == "resnet_18" and recorded["image_size"] == 32
    # Resuming these checkpoints at another image size is refused with one line, nothing rewritten.
    before = open(tmp_path / "models_uql" / "results.json").read()
    args = ["--learner=uniform", "--data_dir_local=" + data_dir] + TINY + ["--image_size=40"]
    refused = run_script("resnet_at_ilsvrc12_run.py", args, str(tmp_path))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error")]  # TensorFlow logs aside
    assert len(lines) == 1 and lines[0].startswith("error: settings differ")
    assert "--image_size 32 (recorded) vs 40 (now)" in lines[0]
    assert open(tmp_path / "models_uql" / "results.json").read() == before


def test_mobilenet_script_quantizes_depthwise_per_channel_by_default(tmp_path, data_dir):
    trained, evaluated, exported = _run_phases(
        "mobilenet_at_ilsvrc12_run.py", ["--mobilenet_version=1", "--mobilenet_depth_mult=0.25"], str(tmp_path),
        data_dir, True)
    report = _check_outputs(str(tmp_path), trained, evaluated, exported)
    depthwise = [layer for layer in report["layers"] if layer.get("op_type") == "DepthwiseConv2dNative"]
    assert len(depthwise) == 13
    for layer in depthwise:
        assert layer["status"] == "quantized" and layer["bucket_type"] == "channel"
        assert layer["num_groups"] == layer["shape"][2] * layer["shape"][3]


def test_mobilenet_v2_builds_with_depthwise_and_residual_layers():
    graph = tf.Graph()
    with graph.as_default():
        from nets import mobilenet  # pylint: disable=import-outside-toplevel
        images = tf.compat.v1.placeholder(tf.float32, [2, 32, 32, 3])
        with tf.compat.v1.variable_scope("model"):
            logits = mobilenet.forward_mobilenet(images, False, 2, 0.35, 1001)
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=4, use_buckets=True),
                                        is_training=False)
    types = [layer.op_type for layer in report.weight_layers]
    # Stem, 16 expansions, 17 depthwise and 17 projections, the last 1x1 conv (1280 wide), fc.
    assert types.count("DepthwiseConv2dNative") == 17 and types.count("Conv2D") == 35 and types[-1] == "MatMul"
    assert logits.shape.as_list() == [2, 1001]


def test_resnet50_report_lists_every_conv_and_the_fc():
    graph = tf.Graph()
    with graph.as_default():
        from nets import imagenet_resnet  # pylint: disable=import-outside-toplevel
        images = tf.compat.v1.placeholder(tf.float32, [None, 64, 64, 3])
        with tf.compat.v1.variable_scope("model"):
            imagenet_resnet.forward_imagenet_resnet(images, True, 50, 1001)
        convs = sorted(op.name for op in graph.get_operations() if op.type == "Conv2D")
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=4), is_training=True)
    listed = [layer for layer in report.weight_layers]
    assert len(convs) == 53  # stem + 16 bottlenecks x 3 + 4 projections
    assert sorted(layer.name for layer in listed if layer.op_type == "Conv2D") == convs
    assert [layer.op_type for layer in listed].count("MatMul") == 1 and len(listed) == 54


def test_flags_of_another_script_are_refused(data_dir):
    from learners import flags as learner_flags  # pylint: disable=import-outside-toplevel
    from learners.errors import UserError  # pylint: disable=import-outside-toplevel
    from learners.helper_factory import make_helper_for  # pylint: disable=import-outside-toplevel
    learner_flags.define_flags()
    flags = learner_flags.FLAGS
    try:
        for script, flag, message in (
                ("mobilenet_at_ilsvrc12", "--resnet_size=50", "--resnet_size=50 has no effect with the "
                 "mobilenet_at_ilsvrc12 run script; expected a ResNet run script, or the flag left out"),
                ("resnet_at_ilsvrc12", "--mobilenet_version=2", "--mobilenet_version=2 has no effect with the "
                 "resnet_at_ilsvrc12 run script; expected a MobileNet run script, or the flag left out"),
                ("resnet_at_fmnist", "--image_size=64", "--image_size=64 has no effect with the resnet_at_fmnist "
                 "run script; expected an ILSVRC-12 run script, or the flag left out")):
            flags.unparse_flags()
            flags(["prog", "--data_dir_local=" + data_dir, flag])
            with pytest.raises(UserError) as info:
                make_helper_for(script)(flags)
            assert str(info.value) == message
        flags.unparse_flags()
        flags(["prog", "--data_dir_local=" + data_dir, "--resnet_size=20", "--image_size=32", "--batch_size=8"])
        with pytest.raises(UserError, match="resnet_size 20 is not supported for ILSVRC-12; allowed values: 18, "
                                            "34, 50, 101"):
            make_helper_for("resnet_at_ilsvrc12")(flags)
    finally:
        flags.unparse_flags()


RECOMPUTE_DEFAULT = """
import sys
from absl import flags
from learners import flags as learner_flags
learner_flags.use_script_defaults(sys.argv[1])
flags.FLAGS(["run"] + sys.argv[2:])
print("recompute", learner_flags.quant_config().recompute_quantized)
"""


@pytest.mark.parametrize("script, given, expected", [
    ("resnet_at_ilsvrc12", [], "all"), ("resnet_at_ilsvrc12", ["--uql_recompute_quantized=none"], "none"),
    ("mobilenet_at_ilsvrc12", [], "none"), ("resnet_at_cifar10", [], "none")])
def test_the_ilsvrc12_resnet_rebuilds_quantized_tensors_in_the_backward_pass_unless_told(script, given, expected):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", RECOMPUTE_DEFAULT, script] + given, capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "recompute " + expected
