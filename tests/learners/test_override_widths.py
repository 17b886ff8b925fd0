"""The analysis's "at the override's width" position of a layer switch against a graph built with that width.

For every kind of quantizer (tests/tfquant/test_layer_switches.CONFIGS, folding at 4 bits: min/max, symmetric, split and LSQ weights;
EMA, PACT and LSQ activations; batch-norm folding; every int8 tensor quantized), the switched graph with one layer
on its 8-bit alternative (tfquant.layer_switches.insert_alternative, built by learners.analysis) must give the logits
of a graph quantize_graph builds directly with that layer at 8 bits and every other at its own width.
"""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from learners import analysis
from tfquant import layer_switches
from tests.tfquant.test_layer_switches import CONFIGS, _forward

tf1 = tf.compat.v1
# Every config of the switch tests with a layer below 8 bits (folded_int8 has none), and folding at 4 bits.
WIDTH_CONFIGS = dict({name: settings for name, settings in CONFIGS.items() if name != "folded_int8"},
                     folded_int4=dict(CONFIGS["folded_int8"], weight_bits=4, activation_bits=4))


def _run(settings, data, target=None, explicit=None):
    """(quantized layer names, logits): with `target`, that layer on its 8-bit alternative in a switched graph;
    with `explicit`, a graph built directly with those bits."""
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(1)
        images = tf1.placeholder(tf.float32, [None, 8, 8, 3])
        logits = _forward(images)
        config = tfquant.QuantConfig(**settings) if explicit is None else tfquant.QuantConfig(
            explicit_bits=explicit, **settings)
        report = tfquant.quantize_graph(graph, config, is_training=False)
        logits = report.output(logits)
        feed = {images: data}
        if target is not None:
            switches, (logits,) = layer_switches.insert_switches(graph, report, [logits])
            record = next(r for r in switches if r.name == target)
            layer = next(layer for layer in report.layers if layer.name == target)
            build = analysis.override_quantizer(layer, config, 8)
            alternative = layer_switches.insert_alternative(record, build)
            feed.update(layer_switches.switch_feed(switches, [r.name for r in switches if r.switch is not
                                                              record.switch]))
            feed[alternative] = True
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            for variable in tf1.global_variables():
                if variable.op.name.endswith("moving_variance"):
                    sess.run(variable.assign(tf.fill(variable.shape, 2.0)))
            return ({layer.name: (layer.bits, layer.kind) for layer in report.layers if layer.quantized},
                    sess.run(logits, feed))


@pytest.mark.parametrize("name", sorted(WIDTH_CONFIGS))
def test_the_alternative_is_the_layer_at_8_bits(name):
    settings = WIDTH_CONFIGS[name]
    data = np.random.RandomState(0).normal(0, 1, (4, 8, 8, 3)).astype(np.float32)
    layers, quantized_logits = _run(settings, data)
    bits = {name: width for name, (width, _) in layers.items()}
    kinds = {}  # the first layer below 8 bits of each kind
    for layer_name, (width, kind) in layers.items():
        if width < 8:
            kinds.setdefault(kind, layer_name)
    checked = 0
    for target in kinds.values():
        _, switched = _run(settings, data, target=target)
        _, direct = _run(settings, data, explicit=dict(bits, **{target: 8}))
        np.testing.assert_allclose(switched, direct, rtol=1e-5, atol=1e-5, err_msg=target)
        # 8 bits changed something: the comparison is not of two copies of the quantized network.
        assert np.max(np.abs(direct - quantized_logits)) > 1e-6, target
        checked += 1
    assert checked == len(kinds) and checked > 0
