"""The training step waits for the model's update ops (batch-norm moving averages, learned-range starts) through
one joining op: every op of the gradient and optimizer pass still runs after every update, but no op carries
one control input per update (626,000 control edges on MobileNetV2 x0.35 with LSQ ranges)."""
import pytest
import tensorflow as tf

import tfquant
from learners import graphs
from nets import model_template

tf1 = tf.compat.v1
CONFIG = tfquant.QuantConfig(weight_bits=4, activation_bits=4, weight_range="lsq", act_range="lsq",
                             use_buckets=True, bucket_type="channel", quantize_all_layers=True)


@pytest.fixture(scope="module")
def model():
    helper = model_template.ModelHelper(batch_size=8, batch_size_eval=100, train_subset=64, eval_subset=100,
                                        nb_epochs_rat=0.25, seed=0)
    return graphs.build_graph(helper, True, quant_config=CONFIG, lrn_rate_fn=graphs.cosine_lrn_rate(0.02, 4))


def _updates_reached(graph, update_names):
    """{op name: the update ops among its ancestors (through data and control inputs)} of every op."""
    def parents(op):
        return [t.op for t in op.inputs] + list(op.control_inputs)

    reached = {}
    for root in graph.get_operations():
        # Iterative post-order: the rewrite reroutes inputs, so creation order is not a topological order.
        stack = [(root, False)]
        while stack:
            op, expanded = stack.pop()
            if op.name in reached:
                continue
            if not expanded:
                stack.append((op, True))
                stack.extend((p, False) for p in parents(op) if p.name not in reached)
                continue
            found = set()
            for parent in parents(op):
                found |= reached[parent.name]
                if parent.name in update_names:
                    found.add(parent.name)
            reached[op.name] = found
    return reached


def test_no_op_carries_one_control_input_per_update(model):
    updates = model.graph.get_collection(tf1.GraphKeys.UPDATE_OPS)
    names = {op.name for op in updates}
    # Two batch norms (mean and variance each) and the first-step stores of the learned ranges.
    assert len(names) >= 4
    # Only the joining NoOp waits on more than one of them (before: each of the step's ~200 source ops did).
    waiting = [op for op in model.graph.get_operations()
               if sum(1 for c in op.control_inputs if c.name in names) > 1]
    assert [op.type for op in waiting] == ["NoOp"]
    assert {c.name for c in waiting[0].control_inputs} == names


def test_the_step_still_runs_after_every_update(model):
    updates = model.graph.get_collection(tf1.GraphKeys.UPDATE_OPS)
    names = {op.name for op in updates}
    reached = _updates_reached(model.graph, names)
    assert reached[model.train_op.name] == names
    # Every op of the gradient and optimizer pass (built under the dependency) waits for all of them.
    step_ops = [op for op in model.graph.get_operations()
                if op.name.startswith(("gradients/", "Momentum/")) and op.name not in names]
    assert len(step_ops) > 100
    late = [op.name for op in step_ops if reached[op.name] != names]
    assert not late, late[:5]
