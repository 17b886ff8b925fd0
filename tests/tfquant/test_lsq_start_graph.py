"""The size of the graph LSQ's first-batch start search adds: the tf.cond branches that hold it are
optimised by Grappler on the first training step and copied with the function library on every new
fetch, so their node count (not wall-clock) is the measure. Before the start search became one loop over
the stacked starts, a channel-bucketed weight's branch alone held about 1,100 nodes."""
import numpy as np
import tensorflow as tf

from tests.conftest import new_session
from tests.tfquant.test_learned_ranges import _least_squares_reference
from tfquant import ops, ranges

tf1 = tf.compat.v1
# Function-library nodes one LSQ start may add (the branch, the loop body and its condition).
MAX_NODES_PER_START = 300


def _library_nodes(graph):
    """{function name: node count} of the graph's function library."""
    return {f.signature.name: len(f.node_def) for f in graph.as_graph_def().library.function}


def test_lsq_starts_keep_the_function_library_small():
    rng = np.random.RandomState(0)
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [8, 6, 6, 5])
        relu_q, relu_params = ranges.quantize_activation(tf.nn.relu(x), 3, "lsq", True, 0.99, "relu_q", "Relu")
        tanh_q, _ = ranges.quantize_activation(tf.tanh(x), 3, "lsq", True, 0.99, "tanh_q", "Tanh")
        w = tf.constant(rng.standard_t(4, size=[3, 3, 5, 16]).astype(np.float32))
        weight_q, weight_params = ranges.quantize_weight_lsq(
            w, 3, ops.GroupLayout("channel", channel_axes=(3,)), "w_quant", True)
    conds = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
    assert len(conds) == 3  # the relu step, the tanh step, the weight steps (LSQ+'s offset is a plain min)
    library = _library_nodes(graph)
    assert sum(library.values()) <= MAX_NODES_PER_START * len(conds), library

    # The search still runs: the first step stores the least-squares step of the batch (NumPy reference).
    x_value = rng.normal(size=[8, 6, 6, 5]).astype(np.float32)
    with new_session(graph) as sess:
        sess.run(tf1.global_variables_initializer())
        sess.run([relu_q, tanh_q, weight_q], {x: x_value})
        relu_step = sess.run(relu_params.parameters[0])
    np.testing.assert_allclose(relu_step, _least_squares_reference(np.maximum(x_value, 0), 7.0), rtol=1e-5)
