"""tfquant.policy: every bit decision with the rule that made it, checked against hand-written tables."""
import pytest

from tfquant import QuantConfig, policy

# Four matmul-like layers in data-flow order (op name, weight variable) and three activations.
LAYERS = [("conv1/Conv2D", "conv1/weights"), ("conv2/Conv2D", "conv2/weights"),
          ("conv3/Conv2D", "conv3/weights"), ("fc/MatMul", "fc/weights")]
ACTIVATIONS = ["conv1/Relu", "conv2/Relu", "conv3/Relu"]
FIRST = "first layer kept float (quantize_all_layers=False)"
LAST = "last layer kept float (quantize_all_layers=False)"
EDGE = "first/last layer rule"


def _table(plan):
    return [(d.op_name, d.kind, d.bits, d.source, d.reason) for d in plan.decisions]


CASES = [
    ("defaults keep the first and last layer float",
     dict(weight_bits=4),
     [("conv1/Conv2D", "weight", 32, EDGE, FIRST), ("conv2/Conv2D", "weight", 4, "weight_bits", ""),
      ("conv3/Conv2D", "weight", 4, "weight_bits", ""), ("fc/MatMul", "weight", 32, EDGE, LAST),
      ("conv1/Relu", "activation", 32, "activation_bits", "bits 32 (activation_bits)"),
      ("conv2/Relu", "activation", 32, "activation_bits", "bits 32 (activation_bits)"),
      ("conv3/Relu", "activation", 32, "activation_bits", "bits 32 (activation_bits)")],
     [], []),
    ("the first matching override wins, beats the first/last rule; unmatched ones are listed",
     dict(weight_bits=4, activation_bits=8, quantize_all_layers=False,
          weight_overrides=[("conv[13]/.*", 2), ("conv1/weights", 8), ("nothing/.*", 3)],
          activation_overrides=[("conv2/Relu", 32), ("zzz", 4)]),
     [("conv1/Conv2D", "weight", 2, "override 'conv[13]/.*'", ""),
      ("conv2/Conv2D", "weight", 4, "weight_bits", ""),
      ("conv3/Conv2D", "weight", 2, "override 'conv[13]/.*'", ""),
      ("fc/MatMul", "weight", 32, EDGE, LAST),
      ("conv1/Relu", "activation", 8, "activation_bits", ""),
      ("conv2/Relu", "activation", 32, "override 'conv2/Relu'", "bits 32 (override 'conv2/Relu')"),
      ("conv3/Relu", "activation", 8, "activation_bits", "")],
     ["conv1/weights", "nothing/.*"], ["zzz"]),
    ("layer_bits beats overrides and the first/last rule; overrides are then not reported unused",
     dict(layer_bits=[8, 32, 2, 3], weight_overrides=[("conv2/.*", 4)]),
     [("conv1/Conv2D", "weight", 8, "layer_bits[0]", ""),
      ("conv2/Conv2D", "weight", 32, "layer_bits[1]", "bits 32 (layer_bits[1])"),
      ("conv3/Conv2D", "weight", 2, "layer_bits[2]", ""), ("fc/MatMul", "weight", 3, "layer_bits[3]", "")],
     [], []),
    ("explicit_bits beats everything, by exact op name, for weights and activations",
     dict(layer_bits=[8, 8, 8, 8], activation_bits=4, activation_overrides=[(".*", 6)],
          explicit_bits={"conv2/Conv2D": 5, "conv3/Relu": 32, "fc/MatMul": 32}),
     [("conv1/Conv2D", "weight", 8, "layer_bits[0]", ""), ("conv2/Conv2D", "weight", 5, "explicit_bits", ""),
      ("conv3/Conv2D", "weight", 8, "layer_bits[2]", ""),
      ("fc/MatMul", "weight", 32, "explicit_bits", "bits 32 (explicit_bits)"),
      ("conv1/Relu", "activation", 6, "override '.*'", ""), ("conv2/Relu", "activation", 6, "override '.*'", ""),
      ("conv3/Relu", "activation", 32, "explicit_bits", "bits 32 (explicit_bits)")],
     [], []),
    ("quantize_all_layers quantizes the edges with the default bits",
     dict(weight_bits=3, quantize_all_layers=True),
     [(name, "weight", 3, "weight_bits", "") for name, _ in LAYERS],
     [], []),
]


@pytest.mark.parametrize("title,settings,expected,unused_weight,unused_activation", CASES, ids=[c[0] for c in CASES])
def test_decisions_and_reasons(title, settings, expected, unused_weight, unused_activation):
    del title
    activations = ACTIVATIONS if any(e[1] == "activation" for e in expected) else []
    plan = policy.decide_bits(LAYERS, activations, QuantConfig(**settings))
    assert _table(plan) == expected
    assert plan.unused_weight_overrides == unused_weight
    assert plan.unused_activation_overrides == unused_activation
    assert plan.decision("conv2/Conv2D").bits == expected[1][2]


def test_layer_bits_of_the_wrong_length_names_the_layers():
    with pytest.raises(ValueError, match=r"layer_bits has 3 entries but the graph has 4 .*conv1/weights, conv2/weights"):
        policy.decide_bits(LAYERS, [], QuantConfig(layer_bits=[4, 4, 4]))


def test_single_layer_is_both_first_and_last():
    plan = policy.decide_bits(LAYERS[:1], [], QuantConfig(weight_bits=4))
    assert _table(plan) == [("conv1/Conv2D", "weight", 32, EDGE, FIRST)]


def test_quantize_graph_reports_the_policy_reasons():
    """The report of a real graph carries the policy's decisions and reasons unchanged."""
    import tensorflow as tf
    import tfquant
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 8])
        for index in range(3):
            with tf1.variable_scope("dense%d" % index):
                x = tf.nn.relu(tf.matmul(x, tf1.get_variable("weights", [8, 8])))
        tf.identity(x, name="logits")
        config = QuantConfig(weight_bits=4, activation_bits=8, weight_overrides=[("dense1/.*", 32)])
        report = tfquant.quantize_graph(graph, config, is_training=False)
    layers = [(layer.name, layer.bits, layer.reason) for layer in report.layers]
    assert layers == [("dense0/MatMul", 32, FIRST), ("dense1/MatMul", 32, "bits 32 (override 'dense1/.*')"),
                      ("dense2/MatMul", 32, LAST), ("dense0/Relu", 8, ""), ("dense1/Relu", 8, ""),
                      ("dense2/Relu", 8, "")]


def test_allocated_and_replayed_bits_are_explicit_decisions():
    """A bit allocation (and a report replayed by config_from_report) reaches the policy as explicit_bits: its
    widths win over overrides and the first/last rule, and a replayed report decides every op as recorded."""
    import tensorflow as tf
    import tfquant
    from tfquant.report import config_from_report
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 8])
        for index in range(4):
            with tf1.variable_scope("dense%d" % index):
                x = tf.nn.relu(tf.matmul(x, tf1.get_variable("weights", [8, 8])))
    layers = [("dense%d/MatMul" % i, "dense%d/weights" % i) for i in range(4)]
    activations = ["dense%d/Relu" % i for i in range(4)]
    # What learners.bit_allocation hands over: the chosen widths of the allocated (middle) layers.
    allocated = QuantConfig(weight_bits=4, activation_bits=8, weight_overrides=[("dense2/.*", 8)],
                            explicit_bits={"dense1/MatMul": 2, "dense2/MatMul": 3, "dense3/Relu": 5})
    plan = policy.decide_bits(layers, activations, allocated)
    assert [(d.op_name, d.bits, d.source) for d in plan.decisions] == [
        ("dense0/MatMul", 32, EDGE), ("dense1/MatMul", 2, "explicit_bits"), ("dense2/MatMul", 3, "explicit_bits"),
        ("dense3/MatMul", 32, EDGE), ("dense0/Relu", 8, "activation_bits"), ("dense1/Relu", 8, "activation_bits"),
        ("dense2/Relu", 8, "activation_bits"), ("dense3/Relu", 5, "explicit_bits")]
    assert plan.unused_weight_overrides == ["dense2/.*"]
    with graph.as_default():
        report = tfquant.quantize_graph(graph, allocated, is_training=False)
    replayed = policy.decide_bits(layers, activations, config_from_report(report))
    recorded = {layer.name: layer.bits for layer in report.layers}
    assert {d.op_name: d.bits for d in replayed.decisions} == recorded
    assert {d.source for d in replayed.decisions} == {"explicit_bits"}


def test_quantize_graph_refuses_an_activation_left_with_float_readers(monkeypatch):
    """The reroute count is checked, as tf.contrib.quantize does: a reader not moved is an error, not a silent skip."""
    import tensorflow as tf
    import tfquant
    from tfquant import rewrite
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 8])
        relu = tf.nn.relu(x)
        tf.identity(relu, name="a")
        tf.identity(relu, name="b")
    monkeypatch.setattr(rewrite, "reroute_consumers", lambda tensor, new, consumers: 1)  # "lost" one reader
    with pytest.raises(RuntimeError, match=r"activation Relu moved 1 of its 2 readers"):
        tfquant.quantize_graph(graph, QuantConfig(activation_bits=8), is_training=False)
