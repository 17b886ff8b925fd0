"""The bit-allocation benchmark's LSQ rows (`benchmarks.bit_allocation --weight_grid lsq`): what measuring each
weight's sensitivity on the grid the run trains changes (issue 31), against measuring it on the min/max grid.

Per budget and seed, three rows fine-tune the seed's float checkpoint with learned-step weights
(--uql_weight_range=lsq), every other flag as in the min/max rows:

  lsq auto          --uql_auto_bits as it is: each weight measured on its LSQ grid at the initial step.
  lsq auto min/max  what --uql_auto_bits chose before the fix: the same search (learners.bit_allocation's
                    measure_and_solve on the run's own flags, training batches and float checkpoint) with only the
                    weight grid of its config set to min/max; its bits are passed as --uql_layer_bits and
                    --uql_activation_overrides, as the random rows' are.
  lsq uniform       the widest uniform width within the budget.

Activation sensitivities do not depend on the weight grid, so the two autos share their activation bits and only
weight bits can differ. LSQ's narrowest width is 2 bits: at 2 equivalent weight bits every layer takes 2 bits
whatever the sensitivities, so only budgets above it get LSQ rows.
"""
import math
import os

from benchmarks import accuracy_table, bit_allocation, publish, stats
from tfquant.config_bits import WEIGHT_GRID_BITS

GRID_FLAGS = ("--uql_weight_range=lsq",)
PREFIX = bit_allocation.LSQ_PREFIX
AUTO, MINMAX_AUTO, UNIFORM = PREFIX + "auto", PREFIX + "auto min/max", PREFIX + "uniform"
METHODS = (AUTO, MINMAX_AUTO, UNIFORM)
KINDS = ("weight", "activation")
# The run script's model (nets/<model>_run.py).
MODEL = accuracy_table.RUN_MODULE.split(".")[-1][:-len("_run")]


def budgets():
    """The BUDGETS where LSQ weights have a choice: equivalent bits above LSQ's narrowest width."""
    fewest = WEIGHT_GRID_BITS["lsq"][0]
    return [b for b in bit_allocation.BUDGETS if b.weight_bits > fewest and b.weight_bit_min >= fewest]


def check_arguments(args, plan):
    """Refuse options the LSQ rows do not take; choose their budgets in `plan` (default: every LSQ budget)."""
    for given, name, why in ((args.timing, "--timing", "search times are measured on the min/max auto rows"),
                             (args.randoms is not None, "--randoms", "the LSQ rows have no random allocations")):
        if given:
            raise publish.BenchmarkError("%s is not valid with --weight_grid=lsq (%s); expected it without"
                                         % (name, why))
    labels = [b.label for b in budgets()]
    if args.budgets is None and not args.quick:
        plan["budgets"] = labels
    refused = [label for label in plan["budgets"] if label not in labels]
    if refused:
        raise publish.BenchmarkError(
            "--budgets=%s is not valid with --weight_grid=lsq: LSQ's narrowest weight width is %d bits, so at %s "
            "every layer takes it whatever the sensitivities; expected a subset of %s"
            % (",".join(plan["budgets"]), WEIGHT_GRID_BITS["lsq"][0], ", ".join(refused), ", ".join(labels)))


def measured_on_minmax(run_flags, float_checkpoint):
    """The allocation record --uql_auto_bits would store for the run of `run_flags` with its weights measured on the
    min/max grid (the search before the fix): the run's own search, only its config's weight grid changed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tfquant
    from learners import bit_allocation as run_allocation, flags as learner_flags, helper_factory
    learner_flags.define_flags()
    settings = learner_flags.FLAGS
    settings.unparse_flags()
    settings(["bit_allocation_lsq"] + list(run_flags))
    learner_flags.validate_flags()
    config = learner_flags.quant_config()
    minmax = tfquant.QuantConfig(**dict(config.to_dict(), weight_range="minmax"))
    helper = helper_factory.make_helper_for(MODEL)(settings)
    return run_allocation.measure_and_solve(helper, settings, minmax, float_checkpoint)


def chosen_bits(record):
    """{kind: {layer name: bits}} of an allocation record (bit_allocation.json's layout)."""
    return {kind: {layer["name"]: layer["bits"] for layer in record[kind]["layers"]} for kind in KINDS
            if kind in record}


def differing_layers(first, second):
    """Names of the weight layers two chosen_bits give different bits, sorted."""
    return sorted(name for name, bits in first["weight"].items() if second["weight"][name] != bits)


def run_budget(work_dir, budget, seed, plan):
    """The three LSQ rows of one budget and seed; each auto entry holds its chosen bits, the min/max-measured one
    also the weight layers whose bits differ from the LSQ-measured allocation's."""
    auto, auto_dir = bit_allocation.run_row(work_dir, budget, AUTO, seed, plan, grid_flags=GRID_FLAGS)
    stored = publish.load_json(os.path.join(auto_dir, "bit_allocation.json"))
    report = publish.load_json(os.path.join(auto_dir, "quant_report.json"))
    # The float checkpoint the auto row measured and fine-tuned (the record holds it relative to its directory).
    float_checkpoint = os.path.normpath(os.path.join(auto_dir, stored["float_checkpoint"]))
    record = measured_on_minmax(bit_allocation.run_script_flags(work_dir, budget, AUTO, seed, plan,
                                                                grid_flags=GRID_FLAGS), float_checkpoint)
    by_op = {op: layer["bits"] for kind in KINDS if kind in record for layer in record[kind]["layers"]
             for op in layer["ops"]}
    minmax = bit_allocation.run_row(work_dir, budget, MINMAX_AUTO, seed, plan,
                                    bit_allocation.explicit_flags(by_op, report), GRID_FLAGS)[0]
    uniform = bit_allocation.run_row(work_dir, budget, UNIFORM, seed, plan, grid_flags=GRID_FLAGS)[0]
    auto["bits"], minmax["bits"] = chosen_bits(stored), chosen_bits(record)
    minmax.update(search_seconds=record["search_seconds"], differing_layers=differing_layers(auto["bits"],
                                                                                             minmax["bits"]),
                  mean_bits={kind: record[kind]["mean_bits"] for kind in KINDS if kind in record})
    uniform["mean_bits"] = {"weight": math.floor(budget.weight_bits)}
    return [auto, minmax, uniform]


def summarize(entries):
    """Per budget with LSQ rows: seeds, each method's accuracy (mean, std over seeds), the paired difference of
    the two autos, and per seed the weight layers whose bits differ (and of how many)."""
    table = {}
    for label in [b.label for b in bit_allocation.BUDGETS]:
        mine = {(e["method"], e["seed"]): e for e in entries if e["budget"] == label and e["method"] in METHODS}
        seeds = sorted({seed for method, seed in mine if all((m, seed) in mine for m in METHODS)})
        if not seeds:
            continue
        accuracy = lambda method: [mine[method, seed]["accuracy"] for seed in seeds]  # noqa: E731
        table[label] = {
            "seeds": seeds, **{method: stats.mean_std(accuracy(method)) for method in METHODS},
            "auto_gain": stats.mean_std(a - b for a, b in zip(accuracy(AUTO), accuracy(MINMAX_AUTO))),
            "differing": [len(mine[MINMAX_AUTO, seed]["differing_layers"]) for seed in seeds],
            "weight_layers": [len(mine[MINMAX_AUTO, seed]["bits"]["weight"]) for seed in seeds]}
    return table


def render_lines(entries):
    """The LSQ part of the section (no lines without LSQ rows)."""
    table = summarize(entries)
    if not table:
        return []
    rows = [(label, ",".join(map(str, t["seeds"])), accuracy_table.percent(*t[AUTO]),
             accuracy_table.percent(*t[MINMAX_AUTO]), accuracy_table.percent(*t[UNIFORM]),
             "%+.2f" % (100 * t["auto_gain"][0]) + ("" if t["auto_gain"][1] is None else
                                                    " ± %.2f" % (100 * t["auto_gain"][1])),
             ", ".join("%d of %d" % pair for pair in zip(t["differing"], t["weight_layers"])))
            for label, t in table.items()]
    lines = ["", "### LSQ weights: sensitivities measured on the trained grid or on min/max (issue 31)", "",
             "- The rows fine-tune learned-step weights (%s), every other flag as above. LSQ auto: --uql_auto_bits, "
             "each weight's sensitivity measured on its LSQ grid at the initial step (the search today). LSQ auto, "
             "min/max-measured: the same search and solver with the weights measured on the min/max grid (the "
             "search before the fix), its bits passed as --uql_layer_bits and --uql_activation_overrides. "
             "Activation sensitivities do not depend on the weight grid, so only weight bits can differ; LSQ's "
             "narrowest width is %d bits, so the 2-bit budgets have no choice to make and no LSQ rows."
             % (" ".join(GRID_FLAGS), WEIGHT_GRID_BITS["lsq"][0]), "",
             publish.markdown_table(("budget", "seeds", "LSQ auto %", "LSQ auto, min/max-measured %", "LSQ uniform %",
                                     "auto - min/max-measured (points, paired by seed)",
                                     "weight layers whose bits differ (per seed)"), rows), ""]
    for seed in sorted({seed for t in table.values() for seed in t["seeds"]}):
        mine = [e for e in entries if e["seed"] == seed and e["budget"] in table]
        lsq = sorted({e["float_accuracy"] for e in mine if bit_allocation.is_lsq(e)})
        other = sorted({e["float_accuracy"] for e in mine if not bit_allocation.is_lsq(e)})
        if other and lsq == other:
            lines.append("- Seed %d: the LSQ rows fine-tune a float checkpoint of the min/max rows' accuracy (%s; the "
                         "header's machine and date are the last part's, the LSQ rows')."
                         % (seed, ", ".join("%.2f %%" % (100 * a) for a in lsq)))
        if other and lsq != other:
            lines.append("- Seed %d: the LSQ rows fine-tune a float checkpoint trained again (%s) rather than the "
                         "min/max rows' (%s); LSQ rows are compared only with each other."
                         % (seed, ", ".join("%.2f %%" % (100 * a) for a in lsq),
                            ", ".join("%.2f %%" % (100 * a) for a in other)))
    for label, t in table.items():
        gain, spread = 100 * t["auto_gain"][0], t["auto_gain"][1]
        lines.append("- LSQ %s: measuring on the trained grid changed the bits of %s weight layers (seeds %s) and "
                     "moved accuracy by %+.2f points on average%s." % (
                         label, ", ".join(map(str, t["differing"])), ",".join(map(str, t["seeds"])), gain,
                         "" if spread is None else " (± %.2f over seeds)" % (100 * spread)))
    return lines
