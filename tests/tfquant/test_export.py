"""Export: packed .tfq file bit-exact against the quantized graph, frozen inference graph, TFLite."""
import hashlib
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tfquant.export import frozen_graph, model_export, packed_file, tflite_export

tf1 = tf.compat.v1
IMAGE_SHAPE = [12, 12, 1]
NUM_CLASSES = 4


def _conv(x, name, out_ch, use_bias):
    with tf1.variable_scope(name):
        w = tf1.get_variable("weights", [3, 3, int(x.shape[-1]), out_ch],
                             initializer=tf1.glorot_uniform_initializer())
        y = tf.nn.conv2d(x, w, strides=1, padding="SAME")
        if use_bias:
            y = tf.nn.bias_add(y, tf1.get_variable("biases", [out_ch], initializer=tf1.zeros_initializer()))
    return y


def _dense(x, name, units):
    with tf1.variable_scope(name):
        w = tf1.get_variable("weights", [int(x.shape[-1]), units], initializer=tf1.glorot_uniform_initializer())
        b = tf1.get_variable("biases", [units], initializer=tf1.zeros_initializer())
        return tf.nn.bias_add(tf.matmul(x, w), b)


def _batch_norm(x, name, is_training):
    ch = int(x.shape[-1])
    with tf1.variable_scope(name):
        beta = tf1.get_variable("beta", [ch], initializer=tf1.zeros_initializer())
        gamma = tf1.get_variable("gamma", [ch], initializer=tf1.ones_initializer())
        mean = tf1.get_variable("moving_mean", [ch], initializer=tf1.zeros_initializer(), trainable=False)
        var = tf1.get_variable("moving_variance", [ch], initializer=tf1.ones_initializer(), trainable=False)
        if not is_training:
            return tf1.nn.fused_batch_norm(x, gamma, beta, mean=mean, variance=var, is_training=False)[0]
        y, batch_mean, batch_var = tf1.nn.fused_batch_norm(x, gamma, beta, is_training=True)
        tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, tf1.assign_sub(mean, (mean - batch_mean) * 0.1))
        tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, tf1.assign_sub(var, (var - batch_var) * 0.1))
        return y


def forward(images, is_training=False):
    """conv-bn-relu, pool, conv(+bias)-relu, fc-relu, fc: every kind of stored variable."""
    x = tf.nn.relu(_batch_norm(_conv(images, "conv1", 8, False), "bn1", is_training))
    x = tf.nn.max_pool2d(x, 2, 2, "SAME")
    x = tf.nn.relu(_conv(x, "conv2", 16, True))
    x = tf.reshape(x, [-1, 6 * 6 * 16])
    x = tf.nn.relu(_dense(x, "fc1", 32))
    return _dense(x, "fc2", NUM_CLASSES)


def _synthetic_data(rng, count):
    """Noisy copies of one fixed template per class, so a few training steps learn the task."""
    templates = np.random.default_rng(7).normal(size=[NUM_CLASSES] + IMAGE_SHAPE).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=count)
    images = templates[labels] + 0.8 * rng.normal(size=[count] + IMAGE_SHAPE).astype(np.float32)
    return images.astype(np.float32), labels


def _save_quantized(directory, config, rng, train_steps=0, forward_fn=forward):
    """Build the training graph, quantize it, train a few steps; returns (checkpoint, report path)."""
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(3)
        images = tf1.placeholder(tf.float32, [None] + IMAGE_SHAPE)
        labels = tf1.placeholder(tf.int64, [None])
        logits = forward_fn(images, is_training=True)
        report = tfquant.quantize_graph(graph, config, is_training=True)
        logits = report.output(logits)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
            train_op = tf1.train.AdamOptimizer(0.01).minimize(loss)
        saver = tf1.train.Saver()
        with new_session(graph) as sess:
            sess.run(tf1.global_variables_initializer())
            for _ in range(train_steps):
                x, y = _synthetic_data(rng, 64)
                sess.run(train_op, {images: x, labels: y})
            if not train_steps:
                # One forward pass records the activation ranges as training would.
                x, _ = _synthetic_data(rng, 16)
                sess.run(logits, {images: x})
            checkpoint = saver.save(sess, os.path.join(directory, "model.ckpt"), global_step=train_steps)
    report_path = os.path.join(directory, "quant_report.json")
    with open(report_path, "w") as handle:
        handle.write(report.to_json())
    return checkpoint, report_path


def _quantized_eval(checkpoint, config, images, forward_fn=forward):
    """(logits, {weight variable: the quantized weight the graph feeds its op}) of the eval graph."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None] + IMAGE_SHAPE)
        logits = forward_fn(x, is_training=False)
        report = tfquant.quantize_graph(graph, config, is_training=False)
        logits = report.output(logits)
        quantized = {layer.weight_variable: graph.get_operation_by_name(layer.name).inputs[layer.input_index]
                     for layer in report.weight_layers if layer.quantized}
        saver = tf1.train.Saver()
        with new_session(graph) as sess:
            saver.restore(sess, checkpoint)
            return sess.run([logits, quantized], {x: images})


LAYOUTS = [dict(use_buckets=False), dict(use_buckets=True, bucket_type="channel"),
           dict(use_buckets=True, bucket_type="split", bucket_size=40)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["none", "channel", "split"])
@pytest.mark.parametrize("bits", [(1, 2, 3, 4), (5, 6, 7, 8)], ids=["1-4", "5-8"])
def test_packed_weights_bit_exact(tmp_path, rng, layout, bits):
    config = tfquant.QuantConfig(layer_bits=bits, **layout)
    checkpoint, report_path = _save_quantized(str(tmp_path), config, rng)
    out = tmp_path / "model.tfq"
    stats = model_export.pack_checkpoint(checkpoint, report_path, out)
    assert stats["file_bytes"] == out.stat().st_size
    assert stats["within_bound"] and stats["file_bytes"] <= stats["bound_bytes"]
    assert stats["accounted_bits"] == stats["total_storage_bits"]
    assert stats["quantized_tensors"] == 4

    weights, metadata = model_export.load_packed_weights(out)
    assert metadata["config"]["layer_bits"] == list(bits)
    _, graph_weights = _quantized_eval(checkpoint, config, np.zeros([1] + IMAGE_SHAPE, np.float32))
    assert len(graph_weights) == 4
    for name, expected in graph_weights.items():
        assert weights[name].dtype == np.float32
        assert np.array_equal(weights[name].view(np.uint32), expected.view(np.uint32)), name
    reader = tf.train.load_checkpoint(checkpoint)
    report = tfquant.QuantReport.from_json(open(report_path).read())
    assert {r.name for r in report.other_variables} <= set(weights)
    for record in report.other_variables:
        assert np.array_equal(weights[record.name], reader.get_tensor(record.name))


def _rewrite_checkpoint(src, dst, change):
    """Copy checkpoint `src` to prefix `dst` with change(dict of values) applied."""
    reader = tf.train.load_checkpoint(src)
    values = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    change(values)
    graph = tf.Graph()
    with graph.as_default():
        variables = [tf1.Variable(value, name=name) for name, value in values.items()]
        with new_session(graph) as sess:
            sess.run(tf1.global_variables_initializer())
            tf1.train.Saver(variables).save(sess, dst)
    return dst


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("small"))
    config = tfquant.QuantConfig(weight_bits=4, use_buckets=True, bucket_type="channel")
    checkpoint, report_path = _save_quantized(directory, config, np.random.default_rng(1))
    return checkpoint, report_path, config


def test_checkpoint_missing_variable(tmp_path, small_checkpoint):
    checkpoint, report_path, _ = small_checkpoint
    broken = _rewrite_checkpoint(checkpoint, str(tmp_path / "broken.ckpt"),
                                 lambda values: values.pop("conv2/weights"))
    out = tmp_path / "model.tfq"
    with pytest.raises(model_export.ExportError) as info:
        model_export.pack_checkpoint(broken, report_path, out)
    message = str(info.value)
    assert "\n" not in message and "conv2/weights" in message and "[3, 3, 8, 16]" in message
    assert not out.exists() and not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def test_checkpoint_other_shape(tmp_path, small_checkpoint):
    checkpoint, report_path, _ = small_checkpoint

    def reshape(values):
        values["bn1/moving_mean"] = np.zeros([5], np.float32)
    broken = _rewrite_checkpoint(checkpoint, str(tmp_path / "broken.ckpt"), reshape)
    out = tmp_path / "model.tfq"
    with pytest.raises(model_export.ExportError) as info:
        model_export.pack_checkpoint(broken, report_path, out)
    message = str(info.value)
    assert "\n" not in message and "bn1/moving_mean" in message and "[5]" in message and "[8]" in message
    assert not out.exists() and not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def test_corrupted_packed_file_detected(tmp_path, small_checkpoint):
    checkpoint, report_path, _ = small_checkpoint
    out = tmp_path / "model.tfq"
    model_export.pack_checkpoint(checkpoint, report_path, out)
    data = out.read_bytes()
    truncated = tmp_path / "truncated.tfq"
    truncated.write_bytes(data[:len(data) // 2])
    flipped = tmp_path / "flipped.tfq"
    flipped.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])
    for path, words in ((truncated, "truncated"), (flipped, "checksum")):
        with pytest.raises(packed_file.PackedFileError, match=words):
            model_export.load_packed_weights(path)


def _weight_inputs(graph_def):
    """(op name, weight input tensor) of every Conv2D/MatMul of an imported frozen graph."""
    graph = tf.Graph()
    with graph.as_default():
        tf1.import_graph_def(graph_def, name="")
    result = []
    for op in graph.get_operations():
        if op.type in ("Conv2D", "MatMul"):
            result.append((op, op.inputs[1]))
    return result


def _ancestor_types(tensor):
    seen, stack, types = set(), [tensor.op], set()
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        types.add(op.type)
        stack.extend(t.op for t in op.inputs)
    return types


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model quantized to 8/4/4/8 weight bits and 8-bit activations, trained on synthetic data."""
    directory = str(tmp_path_factory.mktemp("trained"))
    rng = np.random.default_rng(5)
    config = tfquant.QuantConfig(layer_bits=[8, 4, 4, 8], activation_bits=8, use_buckets=True,
                                 bucket_type="channel")
    checkpoint, report_path = _save_quantized(directory, config, rng, train_steps=120)
    packed = os.path.join(directory, "model.tfq")
    model_export.pack_checkpoint(checkpoint, report_path, packed)
    weights, metadata = model_export.load_packed_weights(packed)
    test_images, test_labels = _synthetic_data(np.random.default_rng(11), 300)
    return dict(directory=directory, checkpoint=checkpoint, report=report_path, config=config,
                decisions=tfquant.report.read_report(report_path),
                weights=weights, metadata=metadata, images=test_images, labels=test_labels,
                train_images=_synthetic_data(np.random.default_rng(12), 200)[0])


def test_frozen_graph_matches_quantized_graph(trained):
    graph_def = frozen_graph.freeze_inference_graph(forward, trained["weights"], trained["decisions"],
                                                    [None] + IMAGE_SHAPE)
    for op, weight in _weight_inputs(graph_def):
        types = _ancestor_types(weight)
        assert "Round" not in types and "Placeholder" not in types, (op.name, types)
        assert types <= {"Const", "Identity"}, (op.name, types)
    assert any(node.op == "Round" for node in graph_def.node)  # activations stay quantized
    frozen = frozen_graph.run_graph_def(graph_def, trained["images"])
    expected, _ = _quantized_eval(trained["checkpoint"], trained["config"], trained["images"])
    np.testing.assert_allclose(frozen, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(frozen.argmax(1), expected.argmax(1))
    assert np.mean(expected.argmax(1) == trained["labels"]) > 0.9


def test_freeze_rejects_mismatched_weights(trained):
    weights = dict(trained["weights"])
    weights["fc1/biases"] = np.zeros([3], np.float32)
    with pytest.raises(model_export.ExportError, match=r"fc1/biases.*\[3\].*\[32\]"):
        frozen_graph.freeze_inference_graph(forward, weights, trained["decisions"], [None] + IMAGE_SHAPE)
    weights = dict(trained["weights"], **{"extra/weights": np.zeros([2], np.float32)})
    with pytest.raises(model_export.ExportError, match="extra/weights"):
        frozen_graph.freeze_inference_graph(forward, weights, trained["decisions"], [None] + IMAGE_SHAPE)


def test_tflite_float_keeps_activation_quantization(trained):
    graph_def = frozen_graph.freeze_inference_graph(forward, trained["weights"], trained["decisions"],
                                                    [None] + IMAGE_SHAPE)
    reference = frozen_graph.run_graph_def(graph_def, trained["images"])
    logits = tflite_export.run_tflite(tflite_export.convert_float(graph_def), trained["images"])
    # Another op order may move an activation across a rounding boundary, so compare predictions.
    assert np.mean(logits.argmax(1) == reference.argmax(1)) >= 0.98
    assert np.median(np.abs(logits - reference)) < 1e-4


def test_tflite_float_and_int8(trained, tmp_path):
    graph_def = frozen_graph.freeze_inference_graph(forward, trained["weights"], trained["decisions"],
                                                    [None] + IMAGE_SHAPE, quantize_activations=False)
    reference = frozen_graph.run_graph_def(graph_def, trained["images"])
    float_model = tflite_export.convert_float(graph_def)
    np.testing.assert_allclose(tflite_export.run_tflite(float_model, trained["images"]), reference,
                               rtol=1e-4, atol=1e-4)
    int8_model = tflite_export.convert_int8(graph_def, trained["train_images"], report=trained["report"])
    path = tmp_path / "model_int8.tflite"
    path.write_bytes(int8_model)
    interpreter = tflite_export.make_interpreter(str(path))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    int8_logits = tflite_export.run_tflite(str(path), trained["images"])
    agreement = np.mean(int8_logits.argmax(1) == reference.argmax(1))
    assert agreement >= 0.9, agreement
    latency = tflite_export.measure_latency({"float": float_model, "int8": int8_model},
                                            trained["images"][:10], repeats=1, warmup=2)
    assert set(latency) == {"float", "int8"} and all(v["count"] == 10 for v in latency.values())
    # The built-in kernels (no XNNPACK delegate) compute the same float model.
    image = trained["images"][0]
    delegated = tflite_export.single_image_runner(float_model)(image)
    builtin = tflite_export.single_image_runner(float_model, default_delegates=False)(image)
    np.testing.assert_allclose(builtin, delegated, rtol=1e-4, atol=1e-4)


def test_int8_refused_for_16_bit_layer(tmp_path, trained):
    report = json.load(open(trained["report"]))
    layer = [entry for entry in report["layers"] if entry["weight_variable"] == "conv2/weights"][0]
    layer["bits"] = 16
    layer["weight_storage_bits"] = 16 * layer["num_params"]  # consistent, or the report schema refuses it
    with pytest.raises(ValueError, match=r"conv2/weights uses 16 bits"):
        tflite_export.convert_int8(b"", trained["train_images"], report=report)


def _run_cli(capsys, *argv):
    from tfquant.export import __main__ as cli
    status = cli.main(list(argv))
    return status, capsys.readouterr().err


def test_cli_bad_input_one_line(tmp_path, capsys, small_checkpoint):
    out = tmp_path / "out"
    status, err = _run_cli(capsys, "--checkpoint_dir", str(tmp_path / "missing"), "--output_dir", str(out))
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ") and "missing" in err
    assert not out.exists()
    status, err = _run_cli(capsys, "--checkpoint_dir", str(tmp_path), "--output_dir", str(out))
    assert status == 2 and err.startswith("error: ") and "quant_report.json" in err and not out.exists()
    # An --eval_npz without labels, or not an .npz at all, is named with what was expected.
    np.savez(tmp_path / "images_only.npz", x_test=np.zeros((2, 4), np.float32))
    (tmp_path / "text.npz").write_text("not numpy")
    for name, fragment in (("images_only.npz", "has no array 'y_test'"), ("text.npz", "expected a NumPy .npz file")):
        status, err = _run_cli(capsys, "--checkpoint_dir", str(tmp_path), "--output_dir", str(out),
                               "--eval_npz", str(tmp_path / name))
        assert status == 2 and err.count("\n") == 1 and err.startswith("error: --eval_npz=") and fragment in err, err
    assert not out.exists()
    # --model is gone: the run directory's inference graph replaces the model registry.
    with pytest.raises(SystemExit) as info:
        _run_cli(capsys, "--checkpoint_dir", str(tmp_path), "--model", "convnet_at_fmnist", "--output_dir", str(out))
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")


# ----- the export command on a real run directory ---------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """models_uql of a short ConvNet uniform run with 8-bit activations, through the run script."""
    import subprocess
    import sys
    cwd = tmp_path_factory.mktemp("convnet_run")
    args = ["--learner=uniform", "--uql_activation_bits=8", "--uql_use_buckets", "--train_subset=256",
            "--eval_subset=64", "--batch_size=32", "--batch_size_eval=64", "--nb_epochs_rat=0.02",
            "--uql_quant_epochs=0.25"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "nets", "convnet_at_fmnist_run.py")] + args,
                            cwd=str(cwd), capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "models_uql"


@pytest.fixture(scope="module")
def eval_npz(tmp_path_factory):
    """The first 64 Fashion-MNIST test images as the ConvNet's evaluation pipeline gives them, with labels."""
    from learners.runner import dataset_arrays
    from nets.convnet_at_fmnist import ModelHelper
    images, labels = dataset_arrays(ModelHelper(batch_size=32, batch_size_eval=64, eval_subset=64), evaluation=True)
    path = tmp_path_factory.mktemp("npz") / "test.npz"
    np.savez(path, x_test=images, y_test=labels)
    return path


def _copy_run(run_dir, destination):
    import shutil
    shutil.copytree(run_dir, destination)
    return destination


def _checkpoint_prefix(directory):
    [index] = [name for name in os.listdir(directory) if name.endswith(".index")]
    return os.path.join(str(directory), index[:-len(".index")])


def _export_args(run, out, npz, *extra):
    return ["--checkpoint_dir", str(run), "--output_dir", str(out), "--eval_npz", str(npz),
            "--eval_subset", "64"] + list(extra)


def _hidden_entries(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def test_cli_export_contents_and_all_or_nothing_replacement(run_dir, eval_npz, tmp_path, capsys):
    out = tmp_path / "nested" / "export"
    status, err = _run_cli(capsys, *_export_args(run_dir, out, eval_npz))
    assert status == 0, err
    assert sorted(os.listdir(out)) == ["export.json", "inference.pb", "model.tfq"]
    assert os.stat(out).st_mode & 0o077 == 0o777 & ~_umask() & 0o077  # not mkdtemp's private 0700
    result = json.load(open(out / "export.json"))
    assert result["test_images"] == 64
    # Built from the saved inference graph alone, the checkpoint scores what the run itself measured on
    # the same 64 test images, and the exported graph exactly that.
    assert result["accuracy"]["quantized_checkpoint"] == json.load(open(run_dir / "results.json"))["quant_accuracy"]
    assert result["accuracy"]["frozen_graph"] == result["accuracy"]["quantized_checkpoint"]
    assert result["frozen_vs_checkpoint"]["argmax_agreement"] == 1.0
    assert result["files"]["packed"]["bytes"] == os.path.getsize(out / "model.tfq")
    for entry in result["files"].values():  # the digests a later read-back (model_files, --check) verifies
        assert entry["sha256"] == hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest(), entry
    report = tfquant.report.read_report(run_dir / "quant_report.json")
    weights, _ = model_export.load_packed_weights(out / "model.tfq")
    reader = tf.train.load_checkpoint(_checkpoint_prefix(run_dir))
    for layer in report.weight_layers:
        if not layer.quantized:  # float layers are stored exactly
            assert np.array_equal(weights[layer.weight_variable], reader.get_tensor(layer.weight_variable))
    for record in report.other_variables:
        assert np.array_equal(weights[record.name], reader.get_tensor(record.name)), record.name
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    # A failing export leaves the previous one byte for byte, and nothing else behind.
    broken = _copy_run(run_dir, tmp_path / "broken")
    data = json.load(open(broken / "quant_report.json"))
    data["version"] = True
    (broken / "quant_report.json").write_text(json.dumps(data))
    status, err = _run_cli(capsys, *_export_args(broken, out, eval_npz))
    assert status == 2 and err.count("\n") == 1 and "version=True" in err, err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert _hidden_entries(out.parent) == [] and _hidden_entries(tmp_path) == []

    # A complete new export replaces the old one as a whole.
    status, err = _run_cli(capsys, *_export_args(run_dir, out, eval_npz)[:-1], "32")
    assert status == 0, err
    assert json.load(open(out / "export.json"))["test_images"] == 32
    assert _hidden_entries(out.parent) == []


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dead_pid():
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_cli_removes_stale_staging_and_restores_set_aside_export(tmp_path, capsys):
    pid = _dead_pid()
    stale = tmp_path / (".export.export-%d-abc" % pid)
    stale.mkdir()
    (stale / "model.tfq").write_bytes(b"partial")
    set_aside = tmp_path / (".export.old-%d-def" % pid)
    set_aside.mkdir()
    (set_aside / "export.json").write_text("{}")
    live = tmp_path / (".export.export-%d-ghi" % os.getpid())  # a running export's staging stays
    live.mkdir()
    status, err = _run_cli(capsys, "--checkpoint_dir", str(tmp_path / "missing"), "--output_dir",
                           str(tmp_path / "export"))
    assert status == 2 and "missing" in err
    assert not stale.exists() and not set_aside.exists() and live.exists()
    assert (tmp_path / "export" / "export.json").read_text() == "{}"


def test_cli_refuses_output_dir_with_other_files(run_dir, eval_npz, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    status, err = _run_cli(capsys, *_export_args(run_dir, out, eval_npz))
    assert status == 2 and err.count("\n") == 1 and "notes.txt" in err and "not part of an export" in err
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def _truncate_data(run):
    [data] = [name for name in os.listdir(run) if ".data-" in name]
    path = os.path.join(str(run), data)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _zero_ema_steps(run, drop=False):
    prefix = _checkpoint_prefix(run)

    def zero(values):
        for name in list(values):
            if name.endswith("/ema_steps"):
                if drop:
                    del values[name]
                else:
                    values[name] = np.zeros_like(values[name])
    _rewrite_checkpoint(prefix, prefix + "-zeroed", zero)
    for suffix in (".index", ".data-00000-of-00001"):
        os.replace(prefix + "-zeroed" + suffix, prefix + suffix)
    name = os.path.basename(prefix)
    (run / "checkpoint").write_text('model_checkpoint_path: "%s"\nall_model_checkpoint_paths: "%s"\n' % (name, name))


def _edit_report(change):
    def edit(run):
        data = json.load(open(run / "quant_report.json"))
        change(data)
        (run / "quant_report.json").write_text(json.dumps(data))
    return edit


def _fifo_index(run):
    prefix = _checkpoint_prefix(run)
    os.remove(prefix + ".index")
    os.mkfifo(prefix + ".index")


def _garbage_state(run):
    (run / "checkpoint").write_bytes(b"\xff\xfe not a state file {{{")


def _other_models_graph(run):
    """The inference graph of another network (a ResNet-20) in place of the run's ConvNet graph."""
    from nets.resnet_at_fmnist import ModelHelper
    from tfquant.export import inference_graph
    helper = ModelHelper.__new__(ModelHelper)  # the forward pass needs the depth only, not the data set
    helper.resnet_size = 20
    inference_graph.save_inference_graph(str(run), helper.forward_eval, [None, 28, 28, 1])


def _buckets_off(data):
    data["config"]["use_buckets"] = False  # while its layers still record channel buckets


def _drop_last_layer(data):
    """A report missing a layer the model has (with the fidelity of that layer gone too, as a consistent file)."""
    name = data["layers"].pop()["name"]
    if "fidelity" in data:
        data["fidelity"]["layers"] = [entry for entry in data["fidelity"]["layers"] if entry["name"] != name]


@pytest.mark.parametrize("damage,fragment", [
    (_truncate_data, "cannot be read"),
    (_zero_ema_steps, "never recorded in training"),
    # A checkpoint whose ranges lack their update counter (written by other code) is named, not a NameError.
    (lambda run: _zero_ema_steps(run, drop=True), "/ema_steps (the range of activation"),
    (_fifo_index, "is a FIFO; expected a regular file"),
    (_garbage_state, None),  # the latest checkpoint is found by listing the directory, not from the state file
    (_other_models_graph, "does not match the model"),
    (_edit_report(lambda d: d.pop("other_variables")), "lacks field 'other_variables'"),
    (_edit_report(lambda d: d["layers"][0].__setitem__("shape", "3x3")), "layers[0].shape"),
    (_edit_report(_drop_last_layer), "does not match the model"),
    (_edit_report(_buckets_off), "bucket_type"),
    (lambda run: os.remove(run / "inference_graph.meta"), "has no inference_graph.meta"),
    (lambda run: (run / "inference_graph.meta").write_bytes(b"garbage"), "cannot be parsed"),
    (_edit_report(lambda d: d["config"].__setitem__("weight_overrides", [["(.*.*)*Z", 2]])),
     None),
])
def test_cli_failures_are_one_line_and_leave_nothing(run_dir, eval_npz, tmp_path, capsys, damage, fragment):
    run = _copy_run(run_dir, tmp_path / "run")
    if damage is not None:
        damage(run)
    out = tmp_path / "export"
    args = ["--checkpoint_dir", str(run), "--output_dir", str(out), "--eval_npz", str(eval_npz), "--eval_subset", "16"]
    status, err = _run_cli(capsys, *args)
    if fragment is None:  # damage that must not matter: a pattern in the report is never compiled, and a
        # garbage state file is only a note (the checkpoint files in the directory are found and used)
        assert status == 0, err
        return
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert not out.exists() and _hidden_entries(tmp_path) == []


def test_cli_stderr_is_exactly_the_error_line(run_dir, tmp_path):
    """Through `python -m`, TensorFlow's start-up lines do not reach stderr."""
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    result = subprocess.run([sys.executable, "-m", "tfquant.export", "--checkpoint_dir", str(run_dir),
                             "--output_dir", str(run_dir)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: --output_dir=") and result.stderr.count("\n") == 1, result.stderr


def test_cli_exports_with_the_application_unimportable(run_dir, eval_npz, tmp_path):
    """With `nets` and `learners` made unimportable, the command still exports and evaluates a run directory."""
    import subprocess
    import sys
    out = tmp_path / "export"
    code = ("import sys; sys.modules['nets'] = sys.modules['learners'] = None; "
            "from tfquant.export.__main__ import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code] + _export_args(run_dir, out, eval_npz),
                            capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                            env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = dict(re.findall(r"^accuracy (\S+)\s+([0-9.]+)$", result.stdout, re.M))
    assert set(accuracy) == {"quantized_checkpoint", "frozen_graph"}
    assert float(accuracy["frozen_graph"]) == float(accuracy["quantized_checkpoint"]) == pytest.approx(
        json.load(open(run_dir / "results.json"))["quant_accuracy"], abs=1e-4)


def test_inference_graph_stores_no_weight_values(tmp_path):
    """A forward pass whose variables start from arrays (as a Keras file's do) is saved without those arrays: the
    file stays small, and the imported graph computes with the values restored from a checkpoint."""
    from tfquant.export import inference_graph
    tf1 = tf.compat.v1
    start = np.random.default_rng(0).normal(size=(256, 512)).astype(np.float32)  # 512 KiB of float32

    def build_forward(images):
        return tf.matmul(images, tf.Variable(start, name="dense/kernel"))

    path = inference_graph.save_inference_graph(str(tmp_path), build_forward, [None, 256])
    assert os.path.getsize(path) < start.nbytes / 20
    trained = np.random.default_rng(1).normal(size=start.shape).astype(np.float32)
    with tf.Graph().as_default():
        tf.Variable(trained, name="dense/kernel")
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            prefix = tf1.train.Saver().save(sess, str(tmp_path / "model.ckpt"))
    images = np.random.default_rng(2).normal(size=(3, 256)).astype(np.float32)
    saved = inference_graph.InferenceGraph(path)
    assert saved.input_shape == [None, 256]
    with tf.Graph().as_default():
        placeholder = tf1.placeholder(tf.float32, [None, 256])
        logits = saved.build_forward(placeholder)
        with tf1.Session() as sess:
            tf1.train.Saver(tf1.global_variables()).restore(sess, prefix)
            np.testing.assert_allclose(sess.run(logits, {placeholder: images}), images @ trained, rtol=1e-5, atol=1e-4)


def test_disagreements_count_ties_in_either_model(rng):
    from tfquant.export import divergence  # pylint: disable=import-outside-toplevel
    # Logits on a coarse grid, as an int8 model's are, so that top-two ties are common.
    reference = rng.integers(0, 24, size=(400, 5)).astype(np.float32) * 0.25
    logits = reference + rng.integers(-3, 4, size=reference.shape) * 0.25 * (rng.random(reference.shape) < 0.3)
    got = divergence.disagreements(reference, logits)

    def tied(row):
        ordered = sorted(row.tolist())
        return ordered[-1] == ordered[-2]

    differ = [i for i in range(len(reference)) if int(np.argmax(logits[i])) != int(np.argmax(reference[i]))]
    assert {key: got[key] for key in ("images", "tied", "reference_ties")} == {
        "images": len(differ), "tied": sum(tied(reference[i]) or tied(logits[i]) for i in differ),
        "reference_ties": sum(tied(row) for row in reference)}
    assert 0 < got["tied"] < got["images"]
    assert divergence.disagreements(reference, reference) == {
        "images": 0, "tied": 0, "reference_ties": got["reference_ties"], "tf_margins": [], "max_tf_margin": None,
        "margin_unit": "output steps", "output_step": 0.25}


def _brute_margins(reference, logits, unit):
    """The reference's top-1 minus top-2 logit on every image the two classify differently, over `unit`."""
    margins = []
    for ref_row, row in zip(reference.tolist(), logits.tolist()):
        if ref_row.index(max(ref_row)) != row.index(max(row)):
            ordered = sorted(ref_row)
            margins.append((ordered[-1] - ordered[-2]) / unit)
    return sorted(margins)


def test_disagreements_give_the_reference_margins_in_output_steps(rng, monkeypatch):
    from tfquant.export import divergence  # pylint: disable=import-outside-toplevel
    # A quantized output: every logit is -1.3 plus a whole number of steps of 0.0371 (8 bits), as float32.
    step = 0.0371
    reference = (np.float32(-1.3) + rng.integers(0, 256, size=(1000, 10)).astype(np.float32) * np.float32(step))
    logits = reference + rng.normal(scale=0.5, size=reference.shape).astype(np.float32)
    got = divergence.disagreements(reference, logits)
    expected = _brute_margins(reference, logits, step)
    assert got["margin_unit"] == "output steps" and got["output_step"] == pytest.approx(step, rel=1e-6)
    assert len(expected) == got["images"] > divergence.MARGINS_KEPT
    np.testing.assert_allclose(got["tf_margins"], expected[-divergence.MARGINS_KEPT:], rtol=1e-3)
    assert got["max_tf_margin"] == pytest.approx(expected[-1], rel=1e-3) and got["max_tf_margin"] == round(
        got["max_tf_margin"])  # whole steps
    monkeypatch.setattr(divergence, "MARGINS_KEPT", 3)
    assert divergence.disagreements(reference, logits)["tf_margins"] == got["tf_margins"][-3:]


def test_disagreements_give_absolute_margins_for_float_logits(rng):
    from tfquant.export import divergence  # pylint: disable=import-outside-toplevel
    reference = rng.normal(size=(300, 10)).astype(np.float32)
    logits = reference + rng.normal(scale=0.1, size=reference.shape).astype(np.float32)
    got = divergence.disagreements(reference, logits)
    expected = _brute_margins(reference, logits, 1.0)
    assert got["margin_unit"] == "logits" and got["output_step"] is None and got["images"] == len(expected) > 0
    np.testing.assert_allclose(got["tf_margins"], expected, rtol=1e-3)
    assert got["max_tf_margin"] == pytest.approx(expected[-1], rel=1e-3)
    # Values on a grid too fine for a quantizer (float32's own spacing) are not taken for an output grid.
    fine = np.float32(2.0) + np.arange(100000, dtype=np.float32).reshape(10000, 10) * np.float32(2.0 ** -22)
    assert divergence.output_step(fine) is None
