"""Batch-norm re-estimation after quantized training (--uql_bn_reestimate_batches N).

The quantized network is built in inference mode (weights on their grid, activation ranges as evaluation uses
them) on the first N batches of the seeded training stream, and every batch norm's moving mean and variance are
replaced by the statistics of its input there, one batch norm after the other in data-flow order, so each is
measured with the batch norms before it already re-estimated: the statistics are exactly those the deployed
network sees on these batches. Nothing else changes; the training session saves them at the final step.
"""
import time

import numpy as np
import tensorflow as tf

import tfquant
from learners import graphs, training
from learners.errors import UserError
from tfquant import bn_statistics

tf1 = tf.compat.v1


def check_config(config, cluster=None):
    """Refuse what re-estimation does not handle (UserError naming it)."""
    if config.fold_batch_norms:
        raise UserError("--uql_bn_reestimate_batches is not valid with --uql_fold_batch_norms; expected unfolded "
                        "batch norms (a folded layer's quantized weight depends on the statistics themselves)")
    if cluster is not None:
        raise UserError("--uql_bn_reestimate_batches is not valid with several workers; expected one process")


def reestimate(helper, config, checkpoint, nb_batches):
    """New moving statistics of every batch norm of the quantized network of `checkpoint`.

    Args:
      helper: a ModelHelper.
      config: the run's QuantConfig.
      checkpoint: the quantized checkpoint.
      nb_batches: training batches to measure on.
    Returns:
      ({variable name: new value}, summary dict: batch norms, batches, seconds, largest relative changes).
    """
    started = time.time()
    graph = tf.Graph()
    with graph.as_default():
        images, _ = helper.build_dataset_train()
        helper.forward_eval(images)
        tfquant.quantize_graph(graph, config, is_training=False)
        batch_norms = bn_statistics.inference_batch_norms(graph)
        sums = [bn_statistics.moment_sums(bn) for bn in batch_norms]
        values = [(tf1.placeholder(tf.float32, bn.moving_mean.shape), tf1.placeholder(tf.float32,
                                                                                       bn.moving_variance.shape))
                  for bn in batch_norms]
        assigns = [tf.group(bn.moving_mean.assign(mean), bn.moving_variance.assign(variance))
                   for bn, (mean, variance) in zip(batch_norms, values)]
        variables = list(graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES))
    covered = {v.op.name for bn in batch_norms for v in (bn.moving_mean, bn.moving_variance)}
    # Unfused batch norms (a Keras layer on a 2-D input) are not found: say so rather than skip them in silence.
    missed = sorted(v.op.name for v in variables if v.op.name.endswith(("moving_mean", "moving_variance"))
                    and v.op.name not in covered)
    if not batch_norms:
        raise UserError("--uql_bn_reestimate_batches: the model has no fused batch norm with moving statistics; "
                        "expected a model with batch norms (or the flag left out)")
    new_values, changes = {}, []
    with graphs.new_session(graph) as sess:
        sess.run(tf1.variables_initializer(variables))
        graphs.restore_variables(sess, variables, checkpoint)
        batches = [sess.run(images) for _ in range(nb_batches)]
        for bn, moment_ops, (mean_in, variance_in), assign in zip(batch_norms, sums, values, assigns):
            old_variance = sess.run(bn.moving_variance)
            totals = [sess.run(moment_ops, feed_dict={images: batch}) for batch in batches]
            mean, variance = bn_statistics.population_statistics(
                sum(t[0] for t in totals), sum(t[1] for t in totals), sum(t[2] for t in totals))
            sess.run(assign, feed_dict={mean_in: mean, variance_in: variance})
            new_values[bn.moving_mean.op.name], new_values[bn.moving_variance.op.name] = mean, variance
            changes.append(float(np.max(np.abs(variance - old_variance) / np.maximum(old_variance, 1e-12))))
    summary = {"batch_norms": len(batch_norms), "batches": nb_batches, "seconds": time.time() - started,
               "largest_variance_change": max(changes), "not_reestimated": missed}
    if missed:
        training.log("uniform: note: %d moving statistics belong to no fused batch norm and were not re-estimated "
                     "(first: %s)" % (len(missed), missed[0]))
    return new_values, summary


def reestimate_and_save(helper, config, sess, model, checkpoint, save_path, nb_batches):
    """Re-estimate the statistics of `checkpoint`, write them into the training session and save at its step.

    The checkpoint of the final step is saved again with only the moving statistics changed: re-estimation
    from the same batches gives the same values whatever statistics it starts from, so a run stopped at any
    point and resumed ends with the same checkpoint.
    Returns:
      (the saved checkpoint, the summary of `reestimate`).
    """
    new_values, summary = reestimate(helper, config, checkpoint, nb_batches)
    by_name = {v.op.name: v for v in model.graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)}
    with model.graph.as_default():
        feeds = {name: tf1.placeholder(by_name[name].dtype.base_dtype, by_name[name].shape) for name in new_values}
        assign = tf.group([by_name[name].assign(feeds[name]) for name in new_values])
    sess.run(assign, feed_dict={feeds[name]: value for name, value in new_values.items()})
    step = int(sess.run(model.global_step))
    saved = training.save_checkpoint(sess, model, save_path, step, last_good=checkpoint)
    training.log("uniform: re-estimated the moving statistics of %d batch norms over %d batches in %.1f s "
                 "(largest change of a variance: %.1f%%); saved %s"
                 % (summary["batch_norms"], nb_batches, summary["seconds"], 100 * summary["largest_variance_change"],
                    saved))
    return saved, summary
