"""A quantized checkpoint records its per-layer decisions; a report is checked against that record."""
import json

import tensorflow as tf

import tfquant
from tfquant import report as report_module

tf1 = tf.compat.v1


def _report(weight_bits=4):
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None, 8, 8, 1])
        kernel = tf1.get_variable("conv/kernel", [3, 3, 1, 4])
        hidden = tf.nn.relu(tf.nn.conv2d(images, kernel, 1, "SAME"))
        dense = tf1.get_variable("fc/kernel", [256, 3])
        tf.matmul(tf.reshape(hidden, [-1, 256]), dense)
        config = tfquant.QuantConfig(weight_bits=weight_bits, activation_bits=8, quantize_all_layers=True,
                                     use_buckets=True, bucket_type="channel")
        return tfquant.quantize_graph(graph, config, is_training=False)


def test_same_decisions_pass_and_a_changed_bit_width_is_named():
    four, two = _report(4), _report(2)
    recorded = report_module.decisions_json(four)
    assert report_module.decisions_difference(recorded, four) is None
    # The same report read back from its JSON (lists instead of tuples) still matches.
    assert report_module.decisions_difference(recorded, tfquant.QuantReport.from_json(four.to_json())) is None
    difference = report_module.decisions_difference(recorded, two)
    assert difference == "layer 0 (Conv2D) has bits 2 in the report, 4 in the checkpoint", difference


def test_layer_count_and_malformed_records_are_differences():
    four = _report(4)
    layers = json.loads(report_module.decisions_json(four))
    assert "lists %d layers" % len(layers) in report_module.decisions_difference(json.dumps(layers[:-1]), four)
    assert "not valid JSON" in report_module.decisions_difference("{[", four)
    assert "malformed" in report_module.decisions_difference(json.dumps([[1]] * len(layers)), four)
    changed = [list(layer) for layer in layers]
    changed[1][report_module.DECISION_FIELDS.index("num_groups")] = 99
    assert "num_groups" in report_module.decisions_difference(json.dumps(changed), four)
