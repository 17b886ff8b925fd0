"""tfquant.graph_build creates the ops TensorFlow's public functions create (compared NodeDef by NodeDef), its
range variables are the ones get_variable makes (same ops but the unread VarIsInitializedOp, same checkpoint),
and quantize_graph's quantizers use fewer ops than before, with values unchanged (against NumPy)."""
import collections

import numpy as np
import tensorflow as tf

import tfquant
from tests.conftest import new_session
from tfquant import graph_build as build
from tfquant import ops, ranges

tf1 = tf.compat.v1


def _node(op):
    """An op's NodeDef with its name scope cut off (two graphs built side by side compare equal)."""
    node = tf1.NodeDef()
    node.CopyFrom(op.node_def)
    node.name = node.name.split("/")[-1]
    node.input[:] = [name.split("/")[-1] for name in node.input]
    return node


def _pair(public, fast):
    """(ops `public()` adds, ops `fast()` adds), each built in its own fresh graph."""
    made = []
    for fn in (public, fast):
        graph = tf.Graph()
        with graph.as_default():
            x = tf1.placeholder(tf.float32, [2, 3], name="x")
            y = tf1.placeholder(tf.float32, [2, 3], name="y")
            before = len(graph.get_operations())
            fn(x, y)
            made.append(graph.get_operations()[before:])
    return made


def test_fast_ops_have_the_public_functions_node_defs():
    cases = [
        (lambda x, y: x - y, lambda x, y: build.binary("Sub", x, y, "sub", None)),
        (lambda x, y: tf.maximum(x, y), lambda x, y: build.binary("Maximum", x, y, "Maximum", None)),
        (lambda x, y: x > y, lambda x, y: build.binary("Greater", x, y, "Greater", None)),
        (lambda x, y: tf.round(x), lambda x, y: build.unary("Round", x, "Round", None)),
        (lambda x, y: tf.stop_gradient(x), lambda x, y: build.unary("StopGradient", x, "StopGradient", None)),
        (lambda x, y: tf.cast(x, tf.int64), lambda x, y: build.cast(x, tf.int64)),
        (lambda x, y: tf.raw_ops.IdentityN(input=[x, y]), lambda x, y: build.identity_n([x, y], "IdentityN", None)),
        (lambda x, y: tf.reduce_max(x, axis=tf.constant([0, 1])),
         lambda x, y: build.reduce("Max", x, build.axes_constant([0, 1]), False, "Max", None)),
        # The switch reads a scalar (a range's minimum): y[0, 0] slices the same way on both sides.
        (lambda x, y: tf.raw_ops.Switch(data=x, pred=tf.equal(tf.bitcast(y[0, 0], tf.int32), tf.constant(0))),
         lambda x, y: build.switch_on_plus_zero(x, y[0, 0])),
        (lambda x, y: tf.raw_ops.Merge(inputs=[x, y]), lambda x, y: build.merge([x, y])),
    ]
    for public, fast in cases:
        public_ops, fast_ops = _pair(public, fast)
        # The fast path shares its constants outside the op's scope; compare the ops that compute.
        public_ops = [op for op in public_ops if op.type != "Const"]
        fast_ops = [op for op in fast_ops if op.type != "Const"]
        assert [_node(op) for op in fast_ops] == [_node(op) for op in public_ops]


def test_contexts_apply_to_fast_ops(graph):
    x = tf1.placeholder(tf.float32, [3])
    gate = tf.identity(x)
    with tf.control_dependencies([gate]), graph.gradient_override_map({"Round": "Identity"}):
        rounded = build.unary("Round", x, "Round", None)
        shifted = build.binary("Sub", x, 1.0, "sub", None)
    assert [op.name for op in rounded.op.control_inputs] == [gate.op.name]
    assert rounded.op.get_attr("_gradient_op_type") == b"Identity"
    # The Python number became one Const shared by the graph, outside the scope and the control dependency.
    constant = shifted.op.inputs[1]
    assert constant.op.type == "Const" and constant.op.name.startswith(build.SHARED_SCOPE + "/")
    assert not constant.op.control_inputs
    assert build.binary("Mul", x, 1.0, "mul", None).op.inputs[1] is constant
    with new_session(graph) as sess:
        np.testing.assert_array_equal(sess.run(shifted, {x: [0.5, 1.5, -2.0]}), np.float32([-0.5, 0.5, -3.0]))


def test_branch_functions_take_the_public_path(graph):
    x = tf1.placeholder(tf.float32, [])
    outside = build.binary("Mul", x, 3.0, "mul", None)
    inside = []

    def branch():
        inside.append(build.binary("Mul", x, 3.0, "mul", lambda a, b: a * b))
        return inside[-1]

    result = tf.cond(x > 0, branch, lambda: x)
    # The branch is a function graph of its own: its constant is its own, not the outer graph's.
    assert inside[0].graph is not graph and inside[0].op.inputs[1].graph is inside[0].graph
    with new_session(graph) as sess:
        assert sess.run([outside, result], {x: 2.0}) == [6.0, 6.0]


def _variable_ops(make):
    graph = tf.Graph()
    with graph.as_default():
        variable = make()
    return graph, variable, {op.name: op for op in graph.get_operations()}


def test_range_variable_is_get_variables_variable_without_is_initialized(tmp_path):
    name = "layer/act_quant/ema_max"

    def public():
        with tf1.variable_scope("layer/act_quant"):
            return ranges._range_variable("ema_max", tf.float32, 0.0)

    def fast():
        return build.range_variable(name, tf.float32, 0, [tf1.GraphKeys.GLOBAL_VARIABLES,
                                                          ranges.RANGE_COLLECTION]).variable

    public_graph, public_var, public_ops = _variable_ops(public)
    fast_graph, fast_var, fast_ops = _variable_ops(fast)
    dropped = name + "/IsInitialized/VarIsInitializedOp"
    assert set(public_ops) - set(fast_ops) == {dropped}
    for op_name, op in fast_ops.items():
        assert op.node_def == public_ops[op_name].node_def, op_name
    assert fast_var.name == public_var.name and fast_var.dtype == public_var.dtype
    assert not fast_var.trainable
    assert fast_graph.get_collection(ranges.RANGE_COLLECTION) == [fast_var]
    # A checkpoint of get_variable's variable restores into this one, and back.
    with public_graph.as_default():
        set_public = public_var.assign(2.5)
        public_saver = tf1.train.Saver()
    with new_session(public_graph) as sess:
        sess.run(public_var.initializer)
        sess.run(set_public)
        path = public_saver.save(sess, str(tmp_path / "public"))
    with fast_graph.as_default():
        fast_saver = tf1.train.Saver()
        init = tf1.global_variables_initializer()
        uninitialized = tf1.report_uninitialized_variables()
    with new_session(fast_graph) as sess:
        assert list(sess.run(uninitialized)) == [name.encode()]
        sess.run(init)
        assert sess.run(fast_var) == 0.0 and len(sess.run(uninitialized)) == 0
        fast_saver.restore(sess, path)
        assert sess.run(fast_var) == 2.5
        with fast_graph.as_default():
            assert fast_var.shape.as_list() == [] and fast_var.op.name == name
            sess.run(fast_var.assign(fast_var.value() + 1.0))
        assert sess.run(fast_var) == 3.5
        sess.run(fast_var.assign(2.5))
        saved = fast_saver.save(sess, str(tmp_path / "fast"))
    assert tf.train.load_variable(saved, name) == 2.5


def test_range_variable_is_reused_and_steps_aside_for_a_taken_name(graph):
    first = build.range_variable("a/v", tf.float32, 0, [])
    assert build.range_variable("a/v", tf.float32, 0, []) is first
    tf.constant(1.0, name="taken")
    assert build.range_variable("taken", tf.float32, 0, []) is None


def _minmax_np(kernel, bits):
    """tfquant.ops' per-output-channel min/max grid, operation by operation in float32."""
    levels = np.float32(2 ** bits - 1)
    low = kernel.min(axis=(0, 1, 2), keepdims=True)
    alpha = np.maximum(kernel.max(axis=(0, 1, 2), keepdims=True) - low, np.float32(0)) + np.float32(ops.RANGE_EPS)
    codes = np.round((kernel - low) * (levels / alpha))
    return codes * (alpha * np.float32(1.0 / levels)) + low


def _small_net(rng):
    x = tf1.placeholder(tf.float32, [4, 6, 6, 3])
    net = x
    for index in range(3):
        kernel = tf1.get_variable("conv%d" % index, initializer=rng.normal(size=[3, 3, 3, 3]).astype(np.float32))
        net = tf.nn.relu(tf.nn.conv2d(net, kernel, 1, "SAME"))
    return x, tf.reduce_mean(net)


def test_quantizers_use_fewer_ops_with_unchanged_values(graph, rng):
    x, out = _small_net(rng)
    before = collections.Counter(op.type for op in graph.get_operations())
    names = {op.name for op in graph.get_operations()}
    config = tfquant.QuantConfig(weight_bits=4, activation_bits=4, use_buckets=True, bucket_type="channel",
                                 quantize_all_layers=True)
    report = tfquant.quantize_graph(graph, config, is_training=True)
    added = collections.Counter(op.type for op in graph.get_operations()) - before
    activations = [layer for layer in report.layers if layer.kind == "activation" and layer.quantized]
    weights = [layer for layer in report.layers if layer.kind == "weight" and layer.quantized]
    assert len(activations) == 3 and len(weights) == 3
    # Before: a VarIsInitializedOp and two extra reads per range variable, a Const per Python number.
    assert added["VarIsInitializedOp"] == 0
    assert added["ReadVariableOp"] == 3 * len(activations)
    per_scope = collections.Counter(op.name.split("/act_quant")[0] for op in graph.get_operations()
                                    if op.name not in names and "/act_quant/" in op.name)
    # 50 before; 38 plus the 5 ops of a training graph's skip of the subtraction when the minimum is +0.0
    # (Bitcast, its zero, Equal, Switch, Merge: ops.minus_minimum).
    assert max(per_scope.values()) <= 43
    per_weight = collections.Counter(op.name.split("/weight_quant")[0] for op in graph.get_operations()
                                     if op.name not in names and "/weight_quant/" in op.name)
    assert max(per_weight.values()) <= 14  # 19 before
    # The values: every weight a reader sees is on its NumPy per-channel grid; the ranges move as before.
    feed = {x: rng.normal(size=[4, 6, 6, 3]).astype(np.float32)}
    conv_ops = [graph.get_operation_by_name(layer.name) for layer in weights]
    variables = {v.op.name: v for v in tf1.global_variables()}
    with new_session(graph) as sess:
        sess.run(tf1.global_variables_initializer())
        seen, kernels = sess.run([[op.inputs[1] for op in conv_ops],
                                  [variables[layer.weight_variable] for layer in weights]], feed)
        for quantized, kernel in zip(seen, kernels):
            np.testing.assert_array_equal(quantized, _minmax_np(kernel, 4))
        relu = graph.get_tensor_by_name(activations[0].name + ":0")
        ema_max = variables[activations[0].name + "/act_quant/ema_max"]
        steps = variables[activations[0].name + "/act_quant/ema_steps"]
        first, _ = sess.run([relu, out], feed)
        assert sess.run(steps) == 1 and sess.run(ema_max) == first.max()
        second, _ = sess.run([relu, out], {x: rng.normal(size=[4, 6, 6, 3]).astype(np.float32)})
        high, new_high = np.float32(first.max()), np.float32(second.max())
        expected = new_high + np.float32(config.act_ema_decay) * (high - new_high)
        assert high != new_high
        assert sess.run(steps) == 2 and sess.run(ema_max) == expected
