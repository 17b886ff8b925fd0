"""The Transformer encoder: its MatMul / BatchMatMulV2 weights in the report, and a few training steps."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from nets import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
tf1 = tf.compat.v1


def _weight_ops(graph):
    """{variable name: op type} of every matmul reading a variable directly (the brute-force reference)."""
    found = {}
    for op in graph.get_operations():
        if op.type in ("MatMul", "BatchMatMulV2"):
            source = op.inputs[1].op
            while source.type in ("Identity", "ReadVariableOp"):
                source = source.inputs[0].op
            if source.type in ("VarHandleOp", "VariableV2"):
                found[source.name] = op.type
    return found


@pytest.mark.parametrize("tokens, length", [("patches", 49), ("rows", 28)])
def test_report_lists_every_matmul_and_batchmatmul_weight(tokens, length):
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [3, 28, 28, 1])
        with tf1.variable_scope("model"):
            logits = transformer.forward_transformer(images, 10, tokens)
        expected = _weight_ops(graph)
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=4, use_buckets=True),
                                        is_training=True)
        embed = graph.get_tensor_by_name("model/add:0")
    assert embed.shape.as_list() == [3, length, 64] and logits.shape.as_list() == [3, 10]
    listed = {layer.weight_variable: layer for layer in report.weight_layers if layer.weight_variable}
    assert {name: layer.op_type for name, layer in listed.items()} == expected
    # Queries, keys and values (2 blocks x 3) multiply [N, T, d] tokens: BatchMatMulV2 with a weight.
    assert sorted(name for name, kind in expected.items() if kind == "BatchMatMulV2") == sorted(
        ["model/embed/weights"] + ["model/block%d/attention/%s/weights" % (b, p) for b in range(2)
                                   for p in ("query", "key", "value")])
    assert len([kind for kind in expected.values() if kind == "MatMul"]) == 7
    for name, layer in listed.items():
        first_or_last = name in ("model/embed/weights", "model/head/weights")
        assert layer.quantized != first_or_last, name
        if layer.quantized:
            assert layer.bits == 4 and layer.num_groups == layer.shape[-1]
    # The attention products of two activations are listed as skipped, not quantized.
    products = [layer for layer in report.weight_layers if not layer.weight_variable]
    assert len(products) == 4 and not any(layer.quantized for layer in products)


def test_quantized_projection_is_the_numpy_quantization_of_its_weight():
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [2, 28, 28, 1])
        with tf1.variable_scope("model"):
            transformer.forward_transformer(images, 10)
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=3), is_training=False)
        layer = [l for l in report.weight_layers if l.weight_variable == "model/block1/attention/key/weights"][0]
        op = graph.get_operation_by_name(layer.name)
        variable = [v for v in tf1.global_variables() if v.op.name == layer.weight_variable][0]
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            quantized, weight = sess.run([op.inputs[layer.input_index], variable])
    low, high = weight.min(), weight.max()
    alpha = high - low + 1e-10
    expected = np.round((weight - low) / alpha * 7) / 7 * alpha + low
    np.testing.assert_allclose(quantized, expected, rtol=1e-5, atol=1e-6)


def test_script_trains_a_few_steps_and_quantizes(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    args = ["--learner=uniform", "--train_subset=256", "--eval_subset=100", "--batch_size=32",
            "--nb_epochs_rat=0.025", "--uql_quant_epochs=0.25", "--summ_step=2", "--transformer_tokens=rows"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "nets", "transformer_at_fmnist_run.py")] + args,
                            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"full-prec iter \d+/4 \| loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 2 and all(np.isfinite(losses))
    results = json.load(open(tmp_path / "models_uql" / "results.json"))
    assert results["model"] == "transformer_rows" and results["test_examples"] == 100
    # 12 of 18 weight layers at 4 bits (the first and last stay float): a real size reduction, counted exactly.
    report = json.load(open(tmp_path / "models_uql" / "quant_report.json"))
    quantized = [l for l in report["layers"] if l["kind"] == "weight" and l["status"] == "quantized"]
    assert {l["op_type"] for l in quantized} == {"MatMul", "BatchMatMulV2"} and len(quantized) == 12
    assert 1.0 < results["compression_ratio"] < 8.0
    reader = tf.train.load_checkpoint(results["quant_checkpoint"])
    start = tf.train.load_checkpoint(results["float_checkpoint"])
    name = "model/block0/attention/query/weights"
    assert not np.array_equal(reader.get_tensor(name), start.get_tensor(name))  # fine-tuning moved the weights


def test_layer_outputs_quantize_the_attention_and_residual_activations():
    """--uql_quantize_layer_outputs gives the Transformer activation quantization: every projection's output (what
    the attention products, softmax and GELU read) and every residual sum (what each layer norm reads)."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [2, 28, 28, 1])
        with tf1.variable_scope("model"):
            transformer.forward_transformer(images, 10)
        report = tfquant.quantize_graph(graph, tfquant.QuantConfig(weight_bits=4, activation_bits=8,
                                                                   quantize_layer_outputs=True), is_training=True)
    quantized = {layer.name for layer in report.activation_layers if layer.quantized and layer.bits == 8}
    for block in range(2):
        for part in ("attention/query", "attention/key", "attention/value", "attention/output", "mlp/fc1",
                     "mlp/fc2"):
            assert "model/block%d/%s/MatMul:output" % (block, part) in quantized
        assert {"model/block%d/add" % block, "model/block%d/add_1" % block} <= quantized
    assert "model/embed/MatMul:input" in quantized
    assert not [layer for layer in report.activation_layers if not layer.quantized]
