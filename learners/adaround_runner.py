"""AdaRound for --learner ptq: learn each quantized weight's rounding on calibration batches, layer by layer.

Layers are taken in data-flow order. Each layer's inputs come from the network with every earlier layer
already on its AdaRound codes (and the later ones on nearest rounding), as the weights-only graph that PTQ
calibrates computes them, activations float; they are computed from the nearest earlier layers' inputs (kept
from those layers' own turn, which no later rounding changes) rather than from the images, and enter the
optimisation only as their Gram matrix (tfquant.adaround_solver). The result is a checkpoint of float weights that tfquant's own
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
from tfquant import adaround, adaround_solver, weight_grids
from tfquant.layout import GroupLayout

tf1 = tf.compat.v1
CHECKPOINT_NAME = "adaround_weights.ckpt"
# Input rows AdaRound minimises a layer's output error on, per weight of one output channel (a random subset when
# there are more: a conv's early layers have hundreds of positions per example; rows beyond a few dozen per weight
# change the rounding little and cost a Gram matrix product each).
ROWS_PER_INPUT = 64


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
    """[(layer, op, data index, variable, LinearView)] of every quantized weight layer AdaRound can express as a
    quadratic problem, each variable once; and [(layer name, reason)] of the quantized ones it leaves on nearest."""
    by_name = {v.op.name: v for v in model_variables}
    seen, targets, skipped = set(), [], []
    for layer in report.weight_layers:
        if not layer.quantized or layer.input_index is None or layer.weight_variable in seen:
            continue
        op = graph.get_operation_by_name(layer.name)
        if len(op.inputs) != 2 or layer.weight_variable not in by_name:
            continue
        view = adaround_solver.linear_view(op, layer.input_index)
        if view is None:
            skipped.append((layer.name, "a %s whose weight has batch dimensions" % op.type))
            continue
        seen.add(layer.weight_variable)
        targets.append((layer, op, 1 - layer.input_index, by_name[layer.weight_variable], view))
    return targets, skipped


def _feed_plan(inputs, images):
    """For each layer input (tensors in data-flow order), the earlier layer inputs to feed when computing it.

    An earlier layer's input never depends on a later layer's weights (data-flow order), so its value, fetched
    when its own layer was rounded, stays valid: feeding it computes a layer's input from the nearest earlier
    ones (a block or two of the network) instead of from the images. Returns (feeds per input, index of the last
    input that feeds each one, or -1).
    """
    feedable = {}
    for index, tensor in enumerate(inputs):
        if tensor.graph.is_feedable(tensor):
            feedable.setdefault(tensor.name, index)
    plans, last_use = [], [-1] * len(inputs)
    for index, tensor in enumerate(inputs):
        earlier = {name for name, first in feedable.items() if first < index}
        feeds, seen, stack = set(), set(), [tensor]
        while stack:
            current = stack.pop()
            if current.name in seen or current is images:
                continue
            seen.add(current.name)
            if current.name in earlier:
                feeds.add(current.name)
                continue
            stack.extend(current.op.inputs)
        plans.append(sorted(feeds))
        for name in feeds:
            last_use[feedable[name]] = max(last_use[feedable[name]], index)
    return plans, last_use


class _CpuPhases:
    """CPU seconds (every thread of the process: time.process_time) spent per named phase."""

    def __init__(self):
        self.seconds = {}
        self._phase, self._since = None, None

    def enter(self, name):
        now = time.process_time()
        if self._phase is not None:
            self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._since
        self._phase, self._since = name, now


def round_weights(helper, config, float_checkpoint, settings, output_dir):
    """Run AdaRound on every quantized weight layer; write the rounded weights' checkpoint.

    Args:
      helper: a ModelHelper.
      config: the QuantConfig of the weights (PTQ's weights_only config: activations float).
      float_checkpoint: the float model's checkpoint.
      settings: parsed flags (uql_adaround_iters, uql_adaround_batches, batch_size, seed).
      output_dir: the quantized run's directory (the checkpoint of rounded weights goes there).
    Returns:
      (checkpoint of the rounded weights, a JSON-ready summary: wall and CPU seconds (CPU per phase), and per layer
      the share of weights rounded otherwise than to nearest and the output errors of both roundings on the
      calibration inputs).
    """
    check_config(config)
    started, cpu_started, phases = time.time(), time.process_time(), _CpuPhases()
    phases.enter("graphs")
    options = adaround.AdaRoundOptions(iterations=settings.uql_adaround_iters, seed=settings.seed,
                                       rows_per_input=ROWS_PER_INPUT)
    graph, images, report, model_variables = _weights_graph(helper, config)
    targets, skipped = _targets(graph, report, model_variables)
    batch_count = settings.uql_adaround_batches
    with graph.as_default():
        # Each weight's grid from its variable, or from the weights fed in its place (the check that the rounded
        # weights quantize to their codes, run with their assignment): one session call each.
        weight_reads = [tf1.placeholder_with_default(variable.read_value(), variable.shape)
                        for _, _, _, variable, _ in targets]
        grid_ops = [adaround.grid_codes(read, layer.bits, _layer_layout(layer), weight_grids.for_layer(layer, config))
                    for (layer, _, _, _, _), read in zip(targets, weight_reads)]
        layer_inputs = [op.inputs[data_index] for _, op, data_index, _, _ in targets]
        gram_ops = [adaround_solver.view_gram(target[4], tensor, _rows_per_batch(options, target[4], batch_count),
                                              seed=options.seed) for target, tensor in zip(targets, layer_inputs)]
        new_values = [tf1.placeholder(variable.dtype.base_dtype, variable.shape) for _, _, _, variable, _ in targets]
        assign_ops = [variable.assign(value) for (_, _, _, variable, _), value in zip(targets, new_values)]
        saver = tf1.train.Saver(var_list=model_variables)
    plans, last_use = _feed_plan(layer_inputs, images)
    solver_graph = tf.Graph()
    with solver_graph.as_default():
        solver = adaround_solver.build_solver(options)
    layers, cached = [], {}
    # Many different small subgraphs, each run a few times: optimizing each on its first run costs more than it saves.
    with graphs.new_session(graph, optimize_graph=False) as sess, graphs.new_session(solver_graph) as solver_sess:
        phases.enter("restore")
        sess.run(tf1.variables_initializer(model_variables))
        graphs.restore_variables(sess, model_variables, float_checkpoint)
        batches = [sess.run(images) for _ in range(batch_count)]
        for index, ((layer, op, data_index, variable, view), weight_read, grid_op, new_value, assign_op) in enumerate(
                zip(targets, weight_reads, grid_ops, new_values, assign_ops)):
            phases.enter("grids")
            weight_value, (codes_before, alpha, beta) = sess.run([weight_read, grid_op])
            grid = adaround.layer_grid(weight_value, codes_before, alpha, beta, layer.bits, _layer_layout(layer),
                                       weight_grids.for_layer(layer, config))
            phases.enter("layer inputs")
            gram_matrix, rows, values = _gram_of(sess, images, batches, gram_ops[index], layer_inputs[index],
                                                 {name: cached[name] for name in plans[index]}, last_use[index] > index)
            if values is not None:
                cached[layer_inputs[index].name] = values
            for name in [name for name in cached if last_use[_first_index(layer_inputs, name)] <= index]:
                del cached[name]
            layer_started = time.time()
            phases.enter("optimisation")
            rounding_up = adaround.optimize(solver_sess, solver, view, gram_matrix, weight_value, grid, options)
            phases.enter("grids")
            codes = adaround.final_codes(grid, rounding_up)
            nearest_error = adaround.output_error(view, gram_matrix, weight_value, grid, grid.nearest)
            adaround_error = adaround.output_error(view, gram_matrix, weight_value, grid, codes)
            rounded = adaround.rounded_weights(weight_value, grid, codes)
            (codes_after, alpha_after, beta_after), _ = sess.run([grid_op, assign_op], feed_dict={
                weight_read: rounded, new_value: rounded})
            if not (np.array_equal(codes_after, codes) and np.array_equal(alpha_after, alpha)
                    and np.array_equal(beta_after, beta)):
                raise RuntimeError("AdaRound's weights of %s do not quantize to its codes on the same grid"
                                   % layer.weight_variable)
            layers.append({"layer": layer.name, "weight_variable": layer.weight_variable, "bits": layer.bits,
                           "changed_share": float(np.mean(codes != grid.nearest)), "rows": rows,
                           "nearest_output_error": nearest_error, "adaround_output_error": adaround_error,
                           "seconds": time.time() - layer_started})
            training.log("adaround: %s: %.1f%% of the weights rounded otherwise than to nearest; output error "
                         "%.4g (nearest) -> %.4g" % (layer.name, 100 * layers[-1]["changed_share"], nearest_error,
                                                    adaround_error))
        phases.enter("save")
        os.makedirs(output_dir, exist_ok=True)
        try:
            checkpoint = saver.save(sess, os.path.join(output_dir, CHECKPOINT_NAME), write_meta_graph=False,
                                    write_state=False)
        except (tf.errors.OpError, OSError) as exc:
            raise UserError("AdaRound's weights cannot be saved in %s (%s); expected a writable directory with "
                            "free space" % (output_dir, getattr(exc, "message", exc)))
    phases.enter(None)
    summary = {"iterations": options.iterations, "batches": batch_count, "rows_per_input": options.rows_per_input,
               "seconds": time.time() - started, "cpu_seconds": time.process_time() - cpu_started,
               "cpu_seconds_by_phase": phases.seconds, "layers": layers,
               "skipped": [{"layer": name, "reason": reason} for name, reason in skipped]}
    return checkpoint, summary


def _rows_per_batch(options, view, batch_count):
    if options.rows_per_input is None:
        return None
    return -(-options.rows_per_input * view.order.shape[1] // batch_count)


def _first_index(tensors, name):
    return next(i for i, tensor in enumerate(tensors) if tensor.name == name)


def _gram_of(sess, images, batches, gram_op, layer_input, feeds, keep):
    """(Gram matrix of the layer's input rows divided by their number (float64), number of rows, the input's value
    per batch when `keep`, else None), over the calibration batches; `feeds` {tensor name: value per batch}."""
    graph = layer_input.graph
    total, rows, values = None, 0, [] if keep else None
    fetches = [gram_op[0], gram_op[1]] + ([layer_input] if keep else [])
    for index, batch in enumerate(batches):
        feed_dict = {images: batch}
        feed_dict.update({graph.get_tensor_by_name(name): value[index] for name, value in feeds.items()})
        result = sess.run(fetches, feed_dict=feed_dict)
        total = result[0].astype(np.float64) if total is None else total + result[0]
        rows += int(result[1])
        if keep:
            values.append(result[2])
    return total / max(rows, 1), rows, values
