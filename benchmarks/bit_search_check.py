"""The bit search's measurement against brute force: the same sensitivities and the same allocations, per seed.

For each seed, --uql_auto_bits's own steps (learners.bit_allocation: the seeded training batches, the float model
on placeholders, the targets) give the sensitivities tfquant.sensitivity.measure returns, and a brute-force
reference computes them again the plain way: every target's quantized value at every width computed alone, on the
run's weight grid (weights) or with the batch's min/max (activations), in a graph of its own, and the whole forward
pass run with it fed (no cut tensors, no shared quantizers, no parallel runs). Both are solved with the run's
budgets; the check fails unless every allocation is the same and every sensitivity agrees to float tolerance.
Process CPU seconds of both are recorded (they are not timing figures: run it beside anything). The measurement
checked is a loss run at every width (--uql_w_measured_widths=0 --uql_a_measured_widths=0); the default's
first-order estimates above the narrowest widths are compared with it by benchmarks.bit_search_estimates.

It also counts the search's arithmetic, which load does not change: the multiply-accumulates (MACs) of the
matmul-like ops each loss run computes (those its target reaches on the way to the loss), in forward passes of
one batch, beside a fine-tuning epoch's (its steps, each taken as three forward passes: the forward, the input
gradient and the weight gradient). Every (target, width) run has an input of its own, so none of its MACs can be
shared with another run: this ratio is what an unchanged measurement costs against an epoch at equal speed.

  .venv/bin/python -m benchmarks.bit_search_check --seeds 0,1,2 \
      --float_checkpoint '/work/bench/acc/seed{seed}/float' --output /tmp/search_check.json
  .venv/bin/python -m benchmarks.bit_search_check --quick --seeds 0,1,2     # a tiny ConvNet, seconds
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from benchmarks import publish
from learners import bit_allocation, graphs
from learners import flags as learner_flags
from tfquant import allocation, match, ops, sensitivity, weight_grids

tf1 = tf.compat.v1
# W2 A2.5 with 1-bit weights allowed: the budget whose search cost issue 36 names.
BUDGET_FLAGS = ["--learner=uniform", "--uql_auto_bits", "--uql_equivalent_bits=2", "--uql_w_bit_min=1",
                "--uql_a_equivalent_bits=2.5"]
# Sensitivities are means of float32 losses; the two paths sum the network's ops in the same order but may
# quantize on differently fused kernels.
ABS_TOLERANCE, REL_TOLERANCE = 1e-5, 1e-4
# A training step's MACs in forward passes: the forward, the gradient of each layer's input and of its weights.
EPOCH_FORWARD_PASSES_PER_STEP = 3


def reference_sensitivities(sess, loss, feeds, targets, bit_widths):
    """{target name: {bits: mean loss increase}} by brute force: one full forward pass per target, width and batch,
    the target's quantized value computed beforehand in a graph of its own (not with sensitivity's quantizers)."""
    def quantize_alone(value, build):
        with tf.Graph().as_default() as graph:
            quantized = build(tf.constant(value))
        with tf1.Session(graph=graph) as alone:
            return alone.run(quantized)

    result = {t.name: {bits: 0.0 for bits in bit_widths[t.kind]} for t in targets}
    for feed in feeds:
        base = float(sess.run(loss, feed))
        for target in targets:
            widths = bit_widths[target.kind]
            if target.kind == sensitivity.WEIGHT:
                grid = target.grid or weight_grids.MinMaxGrid()
                quantized = quantize_alone(sess.run(target.tensors[0]),
                                           lambda x: grid.initial_widths(x, widths, target.layout))
            else:
                quantized = quantize_alone(sess.run(target.tensors[0], feed), lambda x: {
                    bits: ops.quantize_in_range(x, bits, tf.reduce_min(x), tf.reduce_max(x)) for bits in widths})
            for bits, value in quantized.items():
                fed = dict(feed)
                fed.update({tensor: value for tensor in target.tensors})
                result[target.name][bits] += (float(sess.run(loss, fed)) - base) / len(feeds)
    return result


def _matmul_macs(op):
    """Multiply-accumulates of one matmul-like op from its static shapes (0 for any other op)."""
    if op.type in ("Conv2D", "DepthwiseConv2dNative"):
        output, kernel = op.outputs[0].shape, op.inputs[1].shape
        if not (output.is_fully_defined() and kernel.is_fully_defined()):
            raise ValueError("%s %s has no static shape; expected one to count its MACs" % (op.type, op.name))
        height, width, depth = kernel.as_list()[:3]
        # Conv2D sums over every input channel; a depthwise kernel's output channel reads one.
        return int(np.prod(output.as_list())) * height * width * (depth if op.type == "Conv2D" else 1)
    if op.type == "MatMul":
        left, right = op.inputs[0].shape.as_list(), op.inputs[1].shape.as_list()
        rows, inner = left[::-1] if op.get_attr("transpose_a") else left
        columns = right[0] if op.get_attr("transpose_b") else right[1]
        if None in (rows, inner, columns):
            raise ValueError("MatMul %s has no static shape; expected one to count its MACs" % op.name)
        return rows * inner * columns
    return 0


def loss_run_macs(loss, targets, bit_widths):
    """(MACs of one float forward pass to `loss`, MACs of sensitivity.measure's loss runs for one batch).

    A (target, width) run computes the ops its target's tensors reach on the way to the loss (the rest is fed
    from the float pass), so it costs those ops' MACs; each target runs once per width of its kind.
    """
    upstream = match.reachable([loss.op], lambda op: [t.op for t in op.inputs] + list(op.control_inputs))
    forward = sum(_matmul_macs(op) for op in upstream.values())
    runs = 0
    for target in targets:
        reached = match.reachable([c for t in target.tensors for c in t.consumers()], match.readers)
        runs += len(bit_widths[target.kind]) * sum(_matmul_macs(op) for name, op in reached.items()
                                                    if name in upstream)
    return forward, runs


def allocations(settings, targets, measured):
    """{kind: [bits of each target]} solved as --uql_auto_bits solves them."""
    solved = {}
    for kind, _, equivalent, _, _ in bit_allocation._budgets(settings):
        items = [allocation.AllocationItem(t.name, t.size, sensitivity.non_increasing(measured[t.name]))
                 for t in targets[kind]]
        bits = allocation.solve(items, equivalent).bits
        solved[kind] = [bits[t.name] for t in targets[kind]]
    return solved


def _settings(seed, quick, work_dir):
    learner_flags.define_flags()
    flags = learner_flags.FLAGS
    flags.unparse_flags()
    flags(["prog", "--seed=%d" % seed, "--save_path=%s/float/model.ckpt" % work_dir,
           "--uql_save_quant_model_path=%s/quant/model.ckpt" % work_dir, "--log_dir=%s/logs" % work_dir]
          + BUDGET_FLAGS + (["--uql_a_bit_max=4", "--uql_w_bit_max=4"] if quick else []))
    learner_flags.validate_flags()
    return flags, learner_flags.quant_config()


def _helper(seed, quick):
    if quick:
        from nets.convnet_at_fmnist import ModelHelper
        return ModelHelper(batch_size=32, batch_size_eval=64, train_subset=128, eval_subset=64, seed=seed)
    from nets.resnet_at_fmnist import ModelHelper
    return ModelHelper(batch_size=128, batch_size_eval=500, seed=seed)


def _initial_checkpoint(helper, batch, path):
    """A checkpoint of the model's initial weights (--quick: the check needs numbers, not a trained model)."""
    graph = bit_allocation._float_model(helper, batch)[0]
    with graph.as_default():
        saver = tf1.train.Saver()
        init = tf1.global_variables_initializer()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf1.Session(graph=graph) as sess:
        sess.run(init)
        return saver.save(sess, path)


def check_seed(seed, quick, float_checkpoint, work_dir):
    """One seed's comparison: allocations, largest sensitivity difference and CPU seconds of both paths."""
    settings, config = _settings(seed, quick, work_dir)
    helper = _helper(seed, quick)
    batches = bit_allocation._training_batches(helper, seed, settings.uql_sensitivity_batches)
    if float_checkpoint is None:
        float_checkpoint = _initial_checkpoint(helper, batches[0], os.path.join(work_dir, "init%d" % seed, "m.ckpt"))
    graph, images, labels, loss = bit_allocation._float_model(helper, batches[0])
    targets = bit_allocation._targets(graph, config, settings)
    widths = {kind: sensitivity.checked_widths(low, high)
              for kind, _, _, low, high in bit_allocation._budgets(settings)}
    listed = [t for kind in targets for t in targets[kind]]
    with graph.as_default():
        model_variables = list(tf1.global_variables())
    with graphs.new_session(graph, optimize_graph=False) as sess:
        graphs.restore_variables(sess, model_variables, float_checkpoint)
        feeds = [{images: x, labels: y} for x, y in batches]
        started = time.process_time()
        measured = sensitivity.measure(sess, loss, feeds, listed, widths)
        measure_cpu = time.process_time() - started
        started = time.process_time()
        reference = reference_sensitivities(sess, loss, feeds, listed, widths)
        reference_cpu = time.process_time() - started
    pairs = [(measured[name][bits], reference[name][bits]) for name in reference for bits in reference[name]]
    forward_macs, run_macs = loss_run_macs(loss, listed, widths)
    # The float pass of every batch, and its loss runs.
    search_forwards = len(feeds) * (1 + run_macs / forward_macs)
    epoch_forwards = EPOCH_FORWARD_PASSES_PER_STEP * helper.nb_iters_per_epoch
    worst = max(abs(a - b) / (ABS_TOLERANCE + REL_TOLERANCE * abs(b)) for a, b in pairs)
    return {"seed": seed, "float_checkpoint": float_checkpoint,
            "measured_bits": allocations(settings, targets, measured),
            "reference_bits": allocations(settings, targets, reference),
            "max_abs_difference": max(abs(a - b) for a, b in pairs), "worst_tolerance_ratio": worst,
            "targets": len(listed), "loss_runs_per_batch": sum(len(widths[t.kind]) for t in listed),
            "measure_cpu_seconds": measure_cpu, "reference_cpu_seconds": reference_cpu,
            "forward_macs": forward_macs, "search_forward_passes": search_forwards,
            "epoch_forward_passes": epoch_forwards, "search_epoch_mac_ratio": search_forwards / epoch_forwards}


def parse_seeds(text):
    """[seeds] of a comma-separated --seeds value (BenchmarkError unless integers)."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise publish.BenchmarkError("--seeds=%s is not valid; expected comma-separated integers" % text)


def seed_checkpoint(pattern, seed):
    """The checkpoint prefix of --float_checkpoint `pattern` ({seed} replaced; a directory's latest) or None
    without one (BenchmarkError when the path holds no checkpoint)."""
    if not pattern:
        return None
    checkpoint = pattern.replace("{seed}", str(seed))
    checkpoint = tf.train.latest_checkpoint(checkpoint) if os.path.isdir(checkpoint) else checkpoint
    if not checkpoint:
        raise publish.BenchmarkError("--float_checkpoint=%s has no checkpoint for seed %d; expected a checkpoint "
                                     "prefix or a directory holding one" % (pattern, seed))
    return checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny ConvNet from its initial weights, widths 1-4")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--float_checkpoint", help="ResNet-20 float checkpoint (directory or prefix); {seed} is "
                        "replaced by the seed (required without --quick)")
    parser.add_argument("--output", help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    if not args.quick and not args.float_checkpoint:
        raise publish.BenchmarkError("--float_checkpoint is required without --quick; expected the float ResNet-20 "
                                     "checkpoint of each seed, e.g. '/work/bench/acc/seed{seed}/float'")
    results = []
    with tempfile.TemporaryDirectory(prefix="tfquant_search_check_") as work_dir:
        for seed in seeds:
            entry = check_seed(seed, args.quick, seed_checkpoint(args.float_checkpoint, seed),
                               os.path.join(work_dir, "seed%d" % seed))
            results.append(entry)
            same = entry["measured_bits"] == entry["reference_bits"]
            print("seed %d: allocations %s; largest sensitivity difference %.3g (%.2f of the tolerance); CPU s: "
                  "measure %.1f, brute force %.1f; MACs: search %.1f forward passes, %.1f %% of an epoch's; bits %s" % (
                      seed, "the same" if same else "DIFFER", entry["max_abs_difference"],
                      entry["worst_tolerance_ratio"], entry["measure_cpu_seconds"], entry["reference_cpu_seconds"],
                      entry["search_forward_passes"], 100 * entry["search_epoch_mac_ratio"],
                      json.dumps(entry["measured_bits"])), flush=True)
    payload = {"quick": args.quick, "budget": BUDGET_FLAGS, "seeds": results, "load_average": list(os.getloadavg())}
    if args.output:
        publish.write_json(args.output, payload)
    differing = [e["seed"] for e in results if e["measured_bits"] != e["reference_bits"]
                 or e["worst_tolerance_ratio"] > 1]
    if differing:
        raise publish.BenchmarkError("seeds %s: the measured sensitivities or allocations differ from brute force"
                                     % ",".join(map(str, differing)))
    return payload


if __name__ == "__main__":
    publish.run_main(main)
