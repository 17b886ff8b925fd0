"""Do cheaper sensitivity estimates keep today's allocations? Per seed and budget, today's bits (every width of
every target measured on the whole batches) against (a) --measured_widths: only the narrowest widths measured, the
wider ones estimated to first order (--uql_w_measured_widths, --uql_a_measured_widths), and (b) --examples: every
width measured on the first N examples of each batch; the arithmetic of each, and how close today's choice is.

For each seed, --uql_auto_bits's own steps (learners.bit_allocation: the seeded training batches, the float model,
the targets) measure every target at every width once on the whole batches (today's measurement). Each estimate
goes through tfquant.sensitivity.measure as a run would: (a) once per budget, with that budget's widths (the
narrowest of a W3 budget start at 2 bits); (b) once per N, on a float model built for the first N examples. Each is
solved at every budget of benchmarks.bit_allocation (W2 A4, W3 A4, W2 A2.5, W3 A2.5: weights from the budget's
--uql_w_bit_min to 8 bits, activations 2 to 8 where the budget allocates them; one measurement of every width
serves all four, as a width's loss run does not depend on the other widths measured). Per budget it reports the
layers whose bits differ, and the search's multiply-accumulates (counted as benchmarks.bit_search_check counts
them: the float pass, the loss runs of the budget's targets and measured widths, and for (a) the float pass's
backward (two forward passes; the float pass gives the gradients) per batch, in forward passes of the whole batch)
against a fine-tuning epoch's. It also reports today's margin per budget: how much more the next-best allocation's summed sensitivity is
(0 is a tie the solver breaks by its order), which is how far an estimate's values may stray before bits change.

  .venv/bin/python -m benchmarks.bit_search_estimates --seeds 0,1,2 --measured_widths 4:2 --examples 64,120 \
      --float_checkpoint '/work/bench/baselines/ratio1/seed{seed}/float' --output /tmp/search_estimates.json
  .venv/bin/python -m benchmarks.bit_search_estimates --quick --seeds 0                # a tiny ConvNet, seconds
"""
import argparse
import os
import tempfile
import time

from benchmarks import bit_allocation as bit_allocation_table
from benchmarks import bit_search_check, publish
from learners import bit_allocation, graphs
from tfquant import allocation, sensitivity

tf1 = bit_search_check.tf1
QUICK_EXAMPLES = "16,24"
QUICK_MEASURED_WIDTHS = "2:2"


def budget_items(targets, measured, kind, budget):
    """AllocationItems of `kind` as a run at `budget` gives them to the solver (weights from its minimum width)."""
    low = budget.weight_bit_min if kind == sensitivity.WEIGHT else 0
    return [allocation.AllocationItem(t.name, t.size, sensitivity.non_increasing(
        {bits: value for bits, value in measured[t.name].items() if bits >= low})) for t in targets[kind]]


def _kinds(budget):
    """[(kind, equivalent bits)] a run at `budget` allocates."""
    kinds = [(sensitivity.WEIGHT, budget.weight_bits)]
    if budget.activation_budget is not None:
        kinds.append((sensitivity.ACTIVATION, budget.activation_budget))
    return kinds


def budget_bits(targets, measured, budget):
    """{kind: [bits of each target]} at `budget`."""
    return {kind: [allocation.solve(budget_items(targets, measured, kind, budget), equivalent).bits[t.name]
                   for t in targets[kind]] for kind, equivalent in _kinds(budget)}


def margin(items, equivalent):
    """(how much more the next-best allocation's summed sensitivity is, an item it changes, that item's bits there):
    the least over every item held at each of its other widths of the optimum so constrained, solved exactly."""
    best = allocation.solve(items, equivalent)
    closest = (float("inf"), None, None)
    for index, item in enumerate(items):
        for bits in item.sensitivities:
            if bits == best.bits[item.name]:
                continue
            held = list(items)
            held[index] = allocation.AllocationItem(item.name, item.size, {bits: item.sensitivities[bits]})
            try:
                gap = allocation.solve(held, equivalent).objective - best.objective
            except allocation.AllocationError:  # that width alone does not fit the budget
                continue
            closest = min(closest, (gap, item.name, bits), key=lambda entry: entry[0])
    return closest


def _budget_widths(widths, budget, measured_widths=None):
    """{kind: widths a run at `budget` gives loss runs}: weights from its minimum, the narrowest `measured_widths`."""
    kept = {kind: [b for b in widths[kind] if kind != sensitivity.WEIGHT or b >= budget.weight_bit_min]
            for kind, _ in _kinds(budget)}
    return {kind: sensitivity._narrowest(kept[kind], (measured_widths or {}).get(kind)) for kind in kept}


def _search_forward_passes(loss, targets, budget, widths, batches, measured_widths=None):
    """(MACs of a forward pass, the search's MACs at `budget` in forward passes of the measured batch): the float
    pass, the loss runs of the measured widths and, when some widths are estimated, the float pass's backward (the
    gradients come from the float pass: one forward and backward pass in all)."""
    run_widths = _budget_widths(widths, budget, measured_widths)
    listed = [t for kind in run_widths for t in targets[kind]]
    forward, runs = bit_search_check.loss_run_macs(loss, listed, run_widths)
    estimating = any(len(run_widths[kind]) < len(_budget_widths(widths, budget)[kind]) for kind in run_widths)
    gradient = (bit_search_check.EPOCH_FORWARD_PASSES_PER_STEP - 1) * forward if estimating else 0
    return forward, batches * (forward + runs + gradient)


def _measure(helper, batches, config, settings, checkpoint, widths, measured_widths=None):
    """(targets by kind, sensitivities of the kinds `widths` lists, loss tensor, CPU seconds) measured on `batches` as
    --uql_auto_bits does."""
    graph, images, labels, loss = bit_allocation._float_model(helper, batches[0])
    targets = bit_allocation._targets(graph, config, settings)
    with graph.as_default():
        model_variables = list(tf1.global_variables())
    with graphs.new_session(graph, optimize_graph=False) as sess:
        graphs.restore_variables(sess, model_variables, checkpoint)
        started = time.process_time()
        measured = sensitivity.measure(sess, loss, [{images: x, labels: y} for x, y in batches],
                                       [t for kind in widths for t in targets[kind]], widths, measured_widths)
        return targets, measured, loss, time.process_time() - started


def _compared(label, budgets, today, per_budget, epoch_forwards):
    """One estimate's record: per budget (label: (bits, (forward MACs, search MACs), CPU seconds)) the bits, the MAC
    ratio, the measuring's process CPU seconds and the layers whose bits differ from today's."""
    result = {"estimate": label, "budgets": {}}
    for budget in budgets:
        bits, (forward, total), cpu = per_budget[budget.label]
        today_bits = today[budget.label]["bits"]
        result["budgets"][budget.label] = {
            "bits": bits, "search_epoch_mac_ratio": total / forward / epoch_forwards, "measure_cpu_seconds": cpu,
            "layers_differing": {kind: sum(a != b for a, b in zip(bits[kind], today_bits[kind])) for kind in bits}}
    return result


def check_seed(seed, quick, float_checkpoint, work_dir, examples, measured_widths):
    """One seed: today's bits, margins and MACs per budget, then each estimate's bits and MACs per budget.

    Args:
      examples: example counts N (every width measured on the first N examples of each batch).
      measured_widths: [(weight widths, activation widths)] measured, the wider ones estimated to first order.
    """
    settings, config = bit_search_check._settings(seed, quick, work_dir)
    helper = bit_search_check._helper(seed, quick)
    batches = bit_allocation._training_batches(helper, seed, settings.uql_sensitivity_batches)
    if float_checkpoint is None:
        float_checkpoint = bit_search_check._initial_checkpoint(
            helper, batches[0], os.path.join(work_dir, "init%d" % seed, "m.ckpt"))
    widths = {kind: sensitivity.checked_widths(low, high)
              for kind, _, _, low, high in bit_allocation._budgets(settings)}
    size = len(batches[0][0])
    if examples and max(examples) >= size:
        raise publish.BenchmarkError("--examples=%s: a batch holds %d examples; expected fewer"
                                     % (",".join(map(str, examples)), size))
    epoch_forwards = bit_search_check.EPOCH_FORWARD_PASSES_PER_STEP * helper.nb_iters_per_epoch
    budgets = _budgets(quick)
    targets, today, loss, cpu = _measure(helper, batches, config, settings, float_checkpoint, widths)
    entry = {"seed": seed, "float_checkpoint": float_checkpoint, "batch_examples": size,
             "measure_cpu_seconds": cpu, "budgets": {}, "estimates": [],
             "sensitivities": {kind: {t.name: {str(b): v for b, v in today[t.name].items()} for t in targets[kind]}
                               for kind in targets},
             "sizes": {kind: [t.size for t in targets[kind]] for kind in targets},
             # Each target's loss run and a forward pass, in MACs (bit_search_check.loss_run_macs).
             "run_macs": {kind: [bit_search_check.loss_run_macs(loss, [t], {kind: [0]})[1] for t in targets[kind]]
                          for kind in targets},
             "forward_macs": bit_search_check.loss_run_macs(loss, [], {})[0], "epoch_forward_passes": epoch_forwards}
    for budget in budgets:
        forward, total = _search_forward_passes(loss, targets, budget, widths, len(batches))
        gaps = {kind: margin(budget_items(targets, today, kind, budget), equivalent)
                for kind, equivalent in _kinds(budget)}
        entry["budgets"][budget.label] = {
            "bits": budget_bits(targets, today, budget), "search_epoch_mac_ratio": total / forward / epoch_forwards,
            "margin": {kind: {"objective_increase": gap, "layer": name, "bits": bits}
                       for kind, (gap, name, bits) in gaps.items()}}
    for weight_count, activation_count in measured_widths:
        per_budget = {}
        for budget in budgets:
            # A run at this budget measures its own widths (a W3 budget's narrowest start at 2 bits).
            counts = {sensitivity.WEIGHT: weight_count, sensitivity.ACTIVATION: activation_count}
            estimate_targets, measured, estimate_loss, cpu = _measure(helper, batches, config, settings,
                                                                    float_checkpoint, _budget_widths(widths, budget),
                                                                    counts)
            per_budget[budget.label] = (budget_bits(estimate_targets, measured, budget), _search_forward_passes(
                estimate_loss, estimate_targets, budget, widths, len(batches), counts), cpu)
        entry["estimates"].append(_compared("%d weight, %d activation widths measured, wider ones to first order"
                                            % (weight_count, activation_count), budgets, entry["budgets"],
                                            per_budget, epoch_forwards))
    for count in examples:
        fewer_batches = [(x[:count], y[:count]) for x, y in batches]
        fewer_targets, measured, fewer_loss, cpu = _measure(helper, fewer_batches, config, settings, float_checkpoint,
                                                          widths)
        forward = _search_forward_passes(loss, targets, budgets[0], widths, len(batches))[0]
        # Forward passes of N examples, counted on the N-example graph, in forward passes of whole batches.
        per_budget = {budget.label: (budget_bits(fewer_targets, measured, budget), (forward, _search_forward_passes(
            fewer_loss, fewer_targets, budget, widths, len(batches))[1]), cpu) for budget in budgets}
        entry["estimates"].append(_compared("first %d of %d examples" % (count, size), budgets, entry["budgets"],
                                            per_budget, epoch_forwards))
    return entry


def _budgets(quick):
    """benchmarks.bit_allocation's budgets (--quick: W3 A2.5 and W2 A2.5, whose widths a 1-4 bit ConvNet has)."""
    return [b for b in bit_allocation_table.BUDGETS if not quick or b.activation_budget is not None]


def _print_seed(entry):
    for label, today in entry["budgets"].items():
        margins = "; ".join("%s %.2g (%s at %s bits)" % (kind, m["objective_increase"], m["layer"], m["bits"])
                            for kind, m in today["margin"].items())
        print("seed %d %s: today %.2f %% of an epoch's MACs, margin %s; bits %s" % (
            entry["seed"], label, 100 * today["search_epoch_mac_ratio"], margins, today["bits"]))
        for estimate in entry["estimates"]:
            row = estimate["budgets"][label]
            differing = row["layers_differing"]
            print("  %s: %.2f %% of an epoch's MACs, measuring CPU %.1f s (today's %.1f s); %s" % (
                estimate["estimate"], 100 * row["search_epoch_mac_ratio"], row["measure_cpu_seconds"],
                entry["measure_cpu_seconds"],
                "the same bits" if not any(differing.values()) else "DIFFERENT bits (%s)" % ", ".join(
                    "%d %s layers" % (n, kind) for kind, n in differing.items() if n)), flush=True)


def _counts(text, flag, parse):
    """The comma-separated values of `flag` parsed by `parse` (BenchmarkError unless all are valid)."""
    try:
        values = [parse(item) for item in text.split(",")] if text else []
    except ValueError:
        values = None
    if values is None or any(min(v if isinstance(v, tuple) else (v,)) < 1 for v in values):
        raise publish.BenchmarkError("--%s=%s is not valid; expected comma-separated %s" % (
            flag, text, "positive integers" if flag == "examples" else "W:A pairs of positive integers, e.g. 4:2"))
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny ConvNet from its initial weights, widths 1-4")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--measured_widths", help="comma-separated W:A pairs: weight and activation widths measured, "
                        "the wider ones estimated to first order (default 4:2; --quick %s)" % QUICK_MEASURED_WIDTHS)
    parser.add_argument("--examples", help="comma-separated example counts per batch to compare (default none; "
                        "--quick %s)" % QUICK_EXAMPLES)
    parser.add_argument("--float_checkpoint", help="ResNet-20 float checkpoint (directory or prefix); {seed} is "
                        "replaced by the seed (required without --quick)")
    parser.add_argument("--output", help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    seeds = bit_search_check.parse_seeds(args.seeds)
    examples = _counts(args.examples if args.examples is not None else (QUICK_EXAMPLES if args.quick else ""),
                       "examples", int)
    measured_widths = _counts(
        args.measured_widths if args.measured_widths is not None else (QUICK_MEASURED_WIDTHS if args.quick else "4:2"),
        "measured_widths", lambda pair: tuple(int(n) for n in pair.split(":", 1)) if ":" in pair else int("x"))
    if not args.quick and not args.float_checkpoint:
        raise publish.BenchmarkError("--float_checkpoint is required without --quick; expected the float ResNet-20 "
                                     "checkpoint of each seed, e.g. '/work/bench/baselines/ratio1/seed{seed}/float'")
    results = []
    with tempfile.TemporaryDirectory(prefix="tfquant_search_estimates_") as work_dir:
        for seed in seeds:
            checkpoint = bit_search_check.seed_checkpoint(args.float_checkpoint, seed)
            entry = check_seed(seed, args.quick, checkpoint, os.path.join(work_dir, "seed%d" % seed), examples,
                               measured_widths)
            _print_seed(entry)
            results.append(entry)
    labels = [e["estimate"] for e in results[0]["estimates"]]
    kept = [label for index, label in enumerate(labels) if all(
        not any(r["estimates"][index]["budgets"][b]["layers_differing"].values())
        for r in results for b in r["budgets"])]
    print("estimates keeping every seed's and budget's bits: %s" % ("; ".join(kept) or "none"))
    payload = {"quick": args.quick, "examples": examples, "measured_widths": measured_widths, "kept": kept,
               "seeds": results, "load_average": list(os.getloadavg())}
    publish.write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    publish.run_main(main)
