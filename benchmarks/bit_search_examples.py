"""Would fewer examples per measurement keep today's allocations? Per seed and budget, today's bits against the bits
measured on the first N examples of the same batches, the arithmetic of each, and how close today's choice is.

For each seed, --uql_auto_bits's own steps (learners.bit_allocation: the seeded training batches, the float model,
the targets) measure every target at every width once on the whole batches (today's measurement) and once per N of
--examples on a float model built for the first N examples of each batch (the same code path, fewer examples). Each
is solved at every budget of benchmarks.bit_allocation (W2 A4, W3 A4, W2 A2.5, W3 A2.5: weights from the budget's
--uql_w_bit_min to 8 bits, activations 2 to 8 where the budget allocates them), so one measurement serves all four
(a width's loss run does not depend on the other widths measured). Per budget it reports the layers whose bits
differ, and the search's multiply-accumulates (counted as benchmarks.bit_search_check counts them: the float pass
and the loss runs of the budget's targets and widths, in forward passes of the whole batch) against a fine-tuning
epoch's. It also reports today's margin per budget: the smallest increase of the summed sensitivity that any
allocation with one layer changed costs (0 is a tie the solver breaks by its order), which is how far a cheaper
estimate's values may stray before the bits can change.

  .venv/bin/python -m benchmarks.bit_search_examples --seeds 0,1,2 --examples 64,96,120 \
      --float_checkpoint '/work/bench/baselines/ratio1/seed{seed}/float' --output /tmp/search_examples.json
  .venv/bin/python -m benchmarks.bit_search_examples --quick --seeds 0                 # a tiny ConvNet, seconds
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
    """(smallest objective increase of an allocation that changes one item's bits, that item, its bits): the
    optimum with that item held at each other width, solved exactly."""
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


def _search_forward_passes(loss, targets, budget, widths, batches):
    """The search's MACs at `budget` in forward passes of the measured batch: the float pass and the loss runs."""
    listed = [t for kind, _ in _kinds(budget) for t in targets[kind]]
    budget_widths = {kind: [b for b in widths[kind] if kind != sensitivity.WEIGHT or b >= budget.weight_bit_min]
                     for kind in widths}
    forward, runs = bit_search_check.loss_run_macs(loss, listed, budget_widths)
    return forward, batches * (forward + runs)


def _measure(helper, batches, config, settings, checkpoint, widths):
    """(targets by kind, sensitivities, loss tensor, CPU seconds) measured on `batches` as --uql_auto_bits does."""
    graph, images, labels, loss = bit_allocation._float_model(helper, batches[0])
    targets = bit_allocation._targets(graph, config, settings)
    with graph.as_default():
        model_variables = list(tf1.global_variables())
    with graphs.new_session(graph, optimize_graph=False) as sess:
        graphs.restore_variables(sess, model_variables, checkpoint)
        started = time.process_time()
        measured = sensitivity.measure(sess, loss, [{images: x, labels: y} for x, y in batches],
                                       [t for kind in targets for t in targets[kind]], widths)
        return targets, measured, loss, time.process_time() - started


def check_seed(seed, quick, float_checkpoint, work_dir, examples):
    """One seed: today's bits, margins and MACs per budget, and per N of `examples` the bits and MACs on N examples."""
    settings, config = bit_search_check._settings(seed, quick, work_dir)
    helper = bit_search_check._helper(seed, quick)
    batches = bit_allocation._training_batches(helper, seed, settings.uql_sensitivity_batches)
    if float_checkpoint is None:
        float_checkpoint = bit_search_check._initial_checkpoint(
            helper, batches[0], os.path.join(work_dir, "init%d" % seed, "m.ckpt"))
    widths = {kind: sensitivity.checked_widths(low, high)
              for kind, _, _, low, high in bit_allocation._budgets(settings)}
    size = len(batches[0][0])
    if max(examples) >= size:
        raise publish.BenchmarkError("--examples=%s: a batch holds %d examples; expected fewer"
                                     % (",".join(map(str, examples)), size))
    epoch_forwards = bit_search_check.EPOCH_FORWARD_PASSES_PER_STEP * helper.nb_iters_per_epoch
    targets, today, loss, cpu = _measure(helper, batches, config, settings, float_checkpoint, widths)
    entry = {"seed": seed, "float_checkpoint": float_checkpoint, "batch_examples": size,
             "measure_cpu_seconds": cpu, "budgets": {}, "fewer": [],
             "sensitivities": {kind: {t.name: {str(b): v for b, v in today[t.name].items()} for t in targets[kind]}
                               for kind in targets},
             "sizes": {kind: [t.size for t in targets[kind]] for kind in targets}}
    for budget in _budgets(quick):
        forward, total = _search_forward_passes(loss, targets, budget, widths, len(batches))
        gaps = {kind: margin(budget_items(targets, today, kind, budget), equivalent)
                for kind, equivalent in _kinds(budget)}
        entry["budgets"][budget.label] = {
            "bits": budget_bits(targets, today, budget), "search_epoch_mac_ratio": total / forward / epoch_forwards,
            "margin": {kind: {"objective_increase": gap, "layer": name, "bits": bits}
                       for kind, (gap, name, bits) in gaps.items()}}
    for count in examples:
        fewer_batches = [(x[:count], y[:count]) for x, y in batches]
        fewer_targets, measured, fewer_loss, cpu = _measure(helper, fewer_batches, config, settings,
                                                            float_checkpoint, widths)
        result = {"examples": count, "measure_cpu_seconds": cpu, "budgets": {}}
        for budget in _budgets(quick):
            bits = budget_bits(fewer_targets, measured, budget)
            # Forward passes of N examples, counted on the N-example graph, in whole batches.
            total = _search_forward_passes(fewer_loss, fewer_targets, budget, widths, len(batches))[1]
            today_bits = entry["budgets"][budget.label]["bits"]
            result["budgets"][budget.label] = {
                "bits": bits, "search_epoch_mac_ratio": total / forward / epoch_forwards,
                "layers_differing": {kind: sum(a != b for a, b in zip(bits[kind], today_bits[kind])) for kind in bits}}
        entry["fewer"].append(result)
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
        for fewer in entry["fewer"]:
            row = fewer["budgets"][label]
            differing = row["layers_differing"]
            print("  first %d of %d examples: %.2f %% of an epoch's MACs; %s" % (
                fewer["examples"], entry["batch_examples"], 100 * row["search_epoch_mac_ratio"],
                "the same bits" if not any(differing.values()) else "DIFFERENT bits (%s)" % ", ".join(
                    "%d %s layers" % (n, kind) for kind, n in differing.items() if n)), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny ConvNet from its initial weights, widths 1-4")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--examples", help="comma-separated example counts per batch to compare (default 64,96,120; "
                        "--quick %s)" % QUICK_EXAMPLES)
    parser.add_argument("--float_checkpoint", help="ResNet-20 float checkpoint (directory or prefix); {seed} is "
                        "replaced by the seed (required without --quick)")
    parser.add_argument("--output", help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    seeds = bit_search_check.parse_seeds(args.seeds)
    text = args.examples or (QUICK_EXAMPLES if args.quick else "64,96,120")
    try:
        examples = [int(n) for n in text.split(",")]
    except ValueError:
        examples = [0]
    if min(examples) < 1:
        raise publish.BenchmarkError("--examples=%s is not valid; expected comma-separated positive integers" % text)
    if not args.quick and not args.float_checkpoint:
        raise publish.BenchmarkError("--float_checkpoint is required without --quick; expected the float ResNet-20 "
                                     "checkpoint of each seed, e.g. '/work/bench/baselines/ratio1/seed{seed}/float'")
    results = []
    with tempfile.TemporaryDirectory(prefix="tfquant_search_examples_") as work_dir:
        for seed in seeds:
            checkpoint = bit_search_check.seed_checkpoint(args.float_checkpoint, seed)
            entry = check_seed(seed, args.quick, checkpoint, os.path.join(work_dir, "seed%d" % seed), examples)
            _print_seed(entry)
            results.append(entry)
    kept = [n for n in examples if all(not any(r["fewer"][examples.index(n)]["budgets"][b]["layers_differing"]
                                               .values()) for r in results for b in r["budgets"])]
    print("example counts keeping every seed's and budget's bits: %s" % (",".join(map(str, kept)) or "none"))
    payload = {"quick": args.quick, "examples": examples, "kept_examples": kept, "seeds": results,
               "load_average": list(os.getloadavg())}
    publish.write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    publish.run_main(main)
