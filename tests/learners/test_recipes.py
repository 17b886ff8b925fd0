"""Low-bit recipes (issue 34 item 3): a separate range optimizer without weight decay (one step against a hand
computation of Momentum and Adam), weight decay scaled at <= 2 bits (the loss against NumPy), and oscillation
tracking and freezing (against a NumPy simulation of a toy sequence), and a uniform run with all of them."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from learners import graphs, recipes
from learners.uniform_quant import UniformQuantLearner
from nets import model_template
from tfquant import oscillation, weight_grids
from tfquant.layout import GroupLayout
from tests.learners.test_ptq import settings_in

tf1 = tf.compat.v1
NB_ITERS = 10


@pytest.fixture(scope="module")
def helper():
    return model_template.ModelHelper(batch_size=16, batch_size_eval=100, train_subset=256, eval_subset=100,
                                      nb_epochs_rat=0.25, seed=0)


class DecayEverything(model_template.ModelHelper):
    """A helper that decays every variable it is given (so a range variable handed to it would be decayed)."""

    def calc_loss(self, labels, logits, trainable_vars):
        loss, metrics = super().calc_loss(labels, logits, [])
        if trainable_vars:
            loss = loss + self.loss_w_dcy * tf.add_n([tf.nn.l2_loss(v) for v in trainable_vars])
        return loss, dict(metrics, loss=loss)


def cross_entropy_tensor(graph):
    """The per-example cross-entropy of the model's own loss (not the low-bit decay's copies)."""
    ops = [op for op in graph.get_operations() if op.type == "SparseSoftmaxCrossEntropyWithLogits"
           and "low_bit_weight_decay" not in op.name]
    assert len(ops) == 1
    return ops[0].outputs[0]


LSQ_CONFIG = tfquant.QuantConfig(weight_bits=3, activation_bits=3, weight_range="lsq", act_range="lsq",
                                 use_buckets=True, bucket_type="channel", quantize_all_layers=True)


def test_range_optimizer_one_step_against_hand_computation(helper):
    """Step 2 (step 1 stores the initial steps): weights follow Momentum at the weights' rate, ranges Adam at their
    own rate, and the loss decays every weight but no range (the helper here would decay anything it is given)."""
    decay_all = DecayEverything(batch_size=16, batch_size_eval=100, train_subset=256, eval_subset=100,
                                nb_epochs_rat=0.25, seed=0, loss_w_dcy=1e-3)
    chosen = recipes.Recipes(range_optimizer="adam", range_lrn_rate_fn=graphs.cosine_lrn_rate(0.05, NB_ITERS))
    model = graphs.build_graph(decay_all, True, quant_config=LSQ_CONFIG,
                               lrn_rate_fn=graphs.cosine_lrn_rate(0.02, NB_ITERS), momentum=0.9,
                               training_recipes=chosen)
    with model.graph.as_default():
        ranges = recipes.range_variables(model.graph)
        names = {v.op.name for v in ranges}
        weights = [v for v in tf1.trainable_variables() if v.op.name not in names]
        gradients = tf.gradients(model.loss, weights + ranges)
        cross_entropy = tf.reduce_mean(cross_entropy_tensor(model.graph))
    assert len(ranges) == 3 + 2 and all(g is not None for g in gradients)  # 3 weight steps, 2 activation steps
    with graphs.new_session(model.graph) as sess:
        sess.run(model.init_op)
        g1 = sess.run([model.train_op, gradients])[1]
        before = sess.run(weights + ranges)
        _, g2, lr, range_lr, loss, ce = sess.run([model.train_op, gradients, model.lrn_rate,
                                                  model.extra["range_lrn_rate"], model.loss, cross_entropy])
        after = sess.run(weights + ranges)
    n = len(weights)
    np.testing.assert_allclose(lr, 0.02 * 0.5 * (1 + np.cos(np.pi / NB_ITERS)), rtol=1e-6)
    np.testing.assert_allclose(range_lr, 0.05 * 0.5 * (1 + np.cos(np.pi / NB_ITERS)), rtol=1e-6)
    # The decay covers the weights (values before this step) and no range variable.
    np.testing.assert_allclose(loss - ce, 1e-3 * sum(0.5 * np.sum(w ** 2) for w in before[:n]), rtol=1e-4)
    for w0, w1, a, b in zip(before[:n], after[:n], g1[:n], g2[:n]):
        np.testing.assert_allclose(w1, w0 - lr * (0.9 * a + b), rtol=1e-5, atol=1e-7)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for r0, r1, a, b in zip(before[n:], after[n:], g1[n:], g2[n:]):
        assert np.all(a == 0)  # step 1 stored the initial ranges: no gradient reached the variables
        m, v = (1 - beta1) * b, (1 - beta2) * b ** 2
        rate = range_lr * np.sqrt(1 - beta2 ** 2) / (1 - beta1 ** 2)
        np.testing.assert_allclose(r1, r0 - rate * m / (np.sqrt(v) + eps), rtol=1e-4, atol=1e-9)
        assert np.any(r1 != r0)


def test_shared_ranges_are_unchanged(helper):
    """Without the recipe the ranges train with the weights' Momentum optimizer, as before."""
    model = graphs.build_graph(helper, True, quant_config=LSQ_CONFIG,
                               lrn_rate_fn=graphs.cosine_lrn_rate(0.02, NB_ITERS), momentum=0.9,
                               training_recipes=recipes.NO_RECIPES)
    slots = sorted(v.op.name for v in model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)
                   if "lsq_step" in v.op.name and "Momentum" in v.op.name)
    assert len(slots) == 5 and "range_lrn_rate" not in model.extra
