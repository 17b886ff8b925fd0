"""tfquant.bn_statistics: inference batch norms and their moving-statistic variables; statistics gathered over
batches against NumPy's over all values at once."""
import numpy as np
import tensorflow as tf

from tfquant import bn_statistics
from tests.conftest import new_session

tf1 = tf.compat.v1


def test_inference_batch_norms_and_their_statistics_against_numpy(graph, rng):
    x = tf1.placeholder(tf.float32, [None, 5, 5, 3])
    scale, offset = tf1.get_variable("gamma", initializer=np.ones(3, np.float32)), tf1.get_variable(
        "beta", initializer=np.zeros(3, np.float32))
    mean = tf1.get_variable("bn/moving_mean", initializer=np.zeros(3, np.float32), trainable=False)
    variance = tf1.get_variable("bn/moving_variance", initializer=np.ones(3, np.float32), trainable=False)
    y, _, _ = tf1.nn.fused_batch_norm(x, scale, offset, mean=mean, variance=variance, is_training=False)
    tf1.nn.fused_batch_norm(tf.nn.relu(y), scale, offset, is_training=True)  # training mode: no moving statistics
    found = bn_statistics.inference_batch_norms(graph)
    assert [(bn.moving_mean.op.name, bn.moving_variance.op.name, bn.inputs.name, bn.channel_axis) for bn in found] == [
        ("bn/moving_mean", "bn/moving_variance", x.name, -1)]
    sums = bn_statistics.moment_sums(found[0])
    batches = [rng.normal(2.0, 3.0, size=(n, 5, 5, 3)).astype(np.float32) for n in (4, 7, 1)]
    with new_session(graph) as sess:
        parts = [sess.run(sums, feed_dict={x: batch}) for batch in batches]
    got_mean, got_variance = bn_statistics.population_statistics(*(sum(p[i] for p in parts) for i in range(3)))
    values = np.concatenate(batches).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(got_mean, values.mean(0), rtol=1e-6)
    np.testing.assert_allclose(got_variance, values.var(0, ddof=1), rtol=1e-5)
