"""AdaRound for --learner ptq: learn each quantized weight's rounding on calibration batches, layer by layer.

Layers are taken in data-flow order. Each layer's inputs come from the network with every earlier layer
already on its AdaRound codes (and the later ones on nearest rounding), as the weights-only graph that PTQ
calibrates computes them, activations float. The result is a checkpoint of float weights that tfquant's own
quantizer rounds to the AdaRound codes on the unchanged grid (tfquant.adaround.rounded_weights), so the
activation calibration, the saved checkpoint, evaluation and export all run on it unchanged.
"""
import os
import time

import numpy as np
import tensorflow as tf

import tfquant
from learners import graphs, training
from learners.errors import UserError
from tfquant import adaround, weight_grids
from tfquant.layout import GroupLayout

tf1 = tf.compat.v1
CHECKPOINT_NAME = "adaround_weights.ckpt"


def check_config(config):
    """Refuse quantization settings AdaRound does not handle (UserError naming the setting)."""
    grid = weight_grids.for_config(config)
    if not grid.set_by_extremes:
        raise UserError("--uql_adaround is not valid with the %s weight grid (--uql_weight_range); expected minmax "
                        "(AdaRound keeps the min/max or symmetric grid and chooses the rounding on it)" % grid.name)
    for regex, setting in config.weight_overrides:
        if setting.grid is not None and not weight_grids.GRIDS[setting.grid].set_by_extremes:
            raise UserError("--uql_adaround is not valid with --uql_weight_overrides entry %r, which sets the %s "
                            "grid; expected minmax or symmetric" % (regex.pattern, setting.grid))
    if config.fold_batch_norms:
        raise UserError("--uql_adaround is not valid with --uql_fold_batch_norms; expected unfolded weights "
                        "(the folded weight W * gamma / sigma is not a variable the codes can be written to)")


def _weights_graph(helper, weights_config):
    """(graph, images, report, model variables): training batches through the eval-mode network, quantized by
    weights_config (PTQ's: the run's weight settings, activations float)."""
    graph = tf.Graph()
    with graph.as_default():
        images, _ = helper.build_dataset_train()
        helper.forward_eval(images)
        model_variables = list(tf1.global_variables())
        report = tfquant.quantize_graph(graph, weights_config, is_training=False)
    return graph, images, report, model_variables


def _layer_layout(layer):
    return GroupLayout.from_bucket_type(layer.bucket_type, layer.channel_axes, layer.bucket_size)


def _targets(graph, report, model_variables):
    """[(layer, op, data index, variable)] of every quantized weight layer, each variable once."""
    by_name = {v.op.name: v for v in model_variables}
    seen, targets = set(), []
    for layer in report.weight_layers:
        if not layer.quantized or layer.input_index is None or layer.weight_variable in seen:
            continue
        op = graph.get_operation_by_name(layer.name)
        if len(op.inputs) != 2 or layer.weight_variable not in by_name:
            continue
        seen.add(layer.weight_variable)
        targets.append((layer, op, 1 - layer.input_index, by_name[layer.weight_variable]))
    return targets


def _inputs_of(sess, images, tensor, batches):
    return np.concatenate([sess.run(tensor, feed_dict={images: batch}) for batch in batches], axis=0)


def _round_layer(node_def, data_index, weight_index, inputs, weight_value, grid, options):
    """(final codes, nearest error, AdaRound error) of one layer, solved in a graph of its own."""
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(options.seed)
        problem = adaround.build_problem(node_def, data_index, weight_index, [None] + list(inputs.shape[1:]),
                                         weight_value, grid, options)
    with graphs.new_session(graph) as sess:
        rounding_up = adaround.optimize(sess, problem, inputs, options)
        codes = adaround.final_codes(grid, rounding_up)
        nearest_error = adaround.output_error(sess, problem, inputs, grid.nearest)
        adaround_error = adaround.output_error(sess, problem, inputs, codes)
    return codes, nearest_error, adaround_error


def round_weights(helper, config, float_checkpoint, settings, output_dir):
    """Run AdaRound on every quantized weight layer; write the rounded weights' checkpoint.

    Args:
      helper: a ModelHelper.
      config: the QuantConfig of the weights (PTQ's weights_only config: activations float).
      float_checkpoint: the float model's checkpoint.
      settings: parsed flags (uql_adaround_iters, uql_adaround_batches, batch_size, seed).
      output_dir: the quantized run's directory (the checkpoint of rounded weights goes there).
    Returns:
      (checkpoint of the rounded weights, a JSON-ready summary: seconds, and per layer the share of weights
      rounded otherwise than to nearest and the output errors of both roundings on the calibration inputs).
    """
    check_config(config)
    started = time.time()
    options = adaround.AdaRoundOptions(iterations=settings.uql_adaround_iters, seed=settings.seed)
    graph, images, report, model_variables = _weights_graph(helper, config)
    targets = _targets(graph, report, model_variables)
    with graph.as_default():
        grid_ops = [adaround.grid_codes(variable.read_value(), layer.bits, _layer_layout(layer),
                                        weight_grids.for_layer(layer, config)) for layer, _, _, variable in targets]
        new_values = [tf1.placeholder(variable.dtype.base_dtype, variable.shape) for _, _, _, variable in targets]
        assign_ops = [variable.assign(value) for (_, _, _, variable), value in zip(targets, new_values)]
        saver = tf1.train.Saver(var_list=model_variables)
    layers = []
    with graphs.new_session(graph) as sess:
        sess.run(tf1.variables_initializer(model_variables))
        graphs.restore_variables(sess, model_variables, float_checkpoint)
        batches = [sess.run(images) for _ in range(settings.uql_adaround_batches)]
        for (layer, op, data_index, variable), grid_op, new_value, assign_op in zip(targets, grid_ops, new_values,
                                                                                     assign_ops):
            weight_value = sess.run(variable)
            codes_before, alpha, beta = sess.run(grid_op)
            grid = adaround.layer_grid(weight_value, codes_before, alpha, beta, layer.bits, _layer_layout(layer),
                                       weight_grids.for_layer(layer, config))
            inputs = _inputs_of(sess, images, op.inputs[data_index], batches)
            layer_started = time.time()
            codes, nearest_error, adaround_error = _round_layer(op.node_def, data_index, layer.input_index, inputs,
                                                                weight_value, grid, options)
            sess.run(assign_op, feed_dict={new_value: adaround.rounded_weights(weight_value, grid, codes)})
            codes_after, alpha_after, beta_after = sess.run(grid_op)
            if not (np.array_equal(codes_after, codes) and np.array_equal(alpha_after, alpha)
                    and np.array_equal(beta_after, beta)):
                raise RuntimeError("AdaRound's weights of %s do not quantize to its codes on the same grid"
                                   % layer.weight_variable)
            layers.append({"layer": layer.name, "weight_variable": layer.weight_variable, "bits": layer.bits,
                           "changed_share": float(np.mean(codes != grid.nearest)),
                           "nearest_output_error": nearest_error, "adaround_output_error": adaround_error,
                           "seconds": time.time() - layer_started})
            training.log("adaround: %s: %.1f%% of the weights rounded otherwise than to nearest; output error "
                         "%.4g (nearest) -> %.4g" % (layer.name, 100 * layers[-1]["changed_share"], nearest_error,
                                                    adaround_error))
        os.makedirs(output_dir, exist_ok=True)
        try:
            checkpoint = saver.save(sess, os.path.join(output_dir, CHECKPOINT_NAME), write_meta_graph=False,
                                    write_state=False)
        except (tf.errors.OpError, OSError) as exc:
            raise UserError("AdaRound's weights cannot be saved in %s (%s); expected a writable directory with "
                            "free space" % (output_dir, getattr(exc, "message", exc)))
    summary = {"iterations": options.iterations, "batches": settings.uql_adaround_batches,
               "seconds": time.time() - started, "layers": layers}
    return checkpoint, summary
