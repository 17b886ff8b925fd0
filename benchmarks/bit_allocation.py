"""Bit allocation: --uql_auto_bits against uniform bits and against random allocations at the same budgets.

ResNet-20 on all 10,000 Fashion-MNIST test images through the real run script; per seed one float checkpoint,
and every row fine-tuned from it with the same epochs. A random allocation is the exact solver's answer for
random sensitivities, so it fills the budget as tightly as the automatic one does; its per-layer bits are
passed as --uql_layer_bits and --uql_activation_overrides. Search time is compared with one fine-tuning
epoch (training images / the fine-tuning's logged images per second). Budgets and seeds can be run in
parts: each part merges into the results file by (budget, method, seed).

  .venv/bin/python -m benchmarks.bit_allocation --seeds 0,1,2
  .venv/bin/python -m benchmarks.bit_allocation --budgets "W2 A4" --seeds 1,2 --randoms 1
  .venv/bin/python -m benchmarks.bit_allocation --timing --timing_repeats 3    # alone, on a quiet machine
  .venv/bin/python -m benchmarks.bit_allocation --quick --output /tmp/alloc.json --work_dir /tmp/alloc
  .venv/bin/python -m benchmarks.bit_allocation --weight_grid lsq --seeds 0,1,2   # LSQ rows (bit_allocation_lsq)

Accuracy rows may run beside each other (accuracy does not depend on load); their search and epoch times then
do not mean much. --timing runs each budget's auto row again (--timing_repeats times), alone, and records the
median search time and epoch time as the figures the search / epoch column shows; it refuses a busy machine
unless --allow_busy. That the search's measurement gives the same sensitivities and allocations as brute force on
each seed is checked by benchmarks.bit_search_check (any load).
"""
import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import typing

import numpy as np

from benchmarks import accuracy_table, machine, publish, stats
from tfquant import allocation

SECTION = "bit_allocation"
DEFAULT_RESULTS = os.path.join(publish.RESULTS_DIR, "bit_allocation.json")
# The search's cost as a share of a fine-tuning epoch: issue 31's limit, and issue 36's tighter one for W2 A2.5.
SEARCH_LIMIT = 0.10
SEARCH_LIMITS = {"W2 A2.5": 0.05}
N_TRAIN = 60000


class Budget(typing.NamedTuple):
    """Equivalent weight bits, and either uniform activation bits or an activation budget."""

    label: str
    weight_bits: float
    activation_bits: typing.Optional[int] = None
    activation_budget: typing.Optional[float] = None
    weight_bit_min: int = 2


# At 2 equivalent bits with --uql_w_bit_min 2 the only allocation is 2 bits everywhere (measured: auto, uniform
# and random rows were one model): those budgets let the solver go down to 1 bit so a choice exists.
BUDGETS = [Budget("W2 A4", 2, activation_bits=4, weight_bit_min=1), Budget("W3 A4", 3, activation_bits=4),
           Budget("W2 A2.5", 2, activation_budget=2.5, weight_bit_min=1), Budget("W3 A2.5", 3, activation_budget=2.5)]
FULL = dict(accuracy_table.FULL, randoms=5, budgets=[b.label for b in BUDGETS])
QUICK = dict(accuracy_table.QUICK, randoms=1, budgets=["W3 A2.5"])
IMG_PER_S = re.compile(r"^uniform iter \d+/\d+ .*\| (\d+) img/s")
# Methods of benchmarks.bit_allocation_lsq's rows (learned-step weights) start with this; the table here leaves them.
LSQ_PREFIX = "lsq "


def row_flags(budget, method, explicit_bits=None):
    """Run-script flags of one row: 'auto', 'uniform', or explicit bits ((layer_bits, [(activation op, bits)]) as
    explicit_flags gives them: a random allocation, or one solved elsewhere)."""
    if method == "auto":
        flags = ["--uql_auto_bits", "--uql_equivalent_bits=%s" % budget.weight_bits,
                 "--uql_w_bit_min=%d" % budget.weight_bit_min]
        if budget.activation_budget is not None:
            return flags + ["--uql_a_equivalent_bits=%s" % budget.activation_budget]
        return flags + ["--uql_activation_bits=%d" % budget.activation_bits]
    activation_bits = budget.activation_bits or int(math.floor(budget.activation_budget))
    if method == "uniform":  # the widest uniform width within budget
        return ["--uql_weight_bits=%d" % math.floor(budget.weight_bits), "--uql_activation_bits=%d" % activation_bits]
    layer_bits, activation_overrides = explicit_bits
    flags = ["--uql_layer_bits=%s" % ",".join(str(b) for b in layer_bits),
             "--uql_activation_bits=%d" % activation_bits]
    if activation_overrides:
        flags.append("--uql_activation_overrides=%s" % ",".join(
            "%s=%d" % (re.escape(name), bits) for name, bits in activation_overrides))
    return flags


def random_allocation(stored, report, budget, rng):
    """A random allocation within `budget`: the exact solver on random sensitivities of the auto run's layers.

    Args:
      stored: the auto run's bit_allocation.json (layers, sizes, bit ranges).
      report: the auto run's quant_report.json (every weight layer in data-flow order).
      budget: the Budget.
      rng: a numpy Generator.
    Returns:
      ((layer_bits for --uql_layer_bits, [(activation op, bits)]), {kind: mean bits}).
    """
    chosen, means = {}, {}
    for kind, equivalent in (("weight", budget.weight_bits), ("activation", budget.activation_budget)):
        if equivalent is None:
            continue
        entry = stored[kind]
        items = [allocation.AllocationItem(layer["name"], layer["size"],
                                           {b: float(rng.random()) for b in range(entry["bit_min"],
                                                                                  entry["bit_max"] + 1)})
                 for layer in entry["layers"]]
        solved = allocation.solve(items, equivalent)
        means[kind] = solved.mean_bits
        for layer in entry["layers"]:
            chosen.update({op: solved.bits[layer["name"]] for op in layer["ops"]})
    return explicit_flags(chosen, report), means


def explicit_flags(chosen, report):
    """(layer_bits for --uql_layer_bits, [(activation op, bits)]) of the bits {op name: bits} an allocation chose,
    in the data-flow order of `report` (a run's quant_report.json; layers it does not choose stay float)."""
    layer_bits = [chosen.get(layer["name"], 32) for layer in report["layers"]
                  if layer["kind"] == "weight" and layer.get("input_index") is not None]
    activations = [(layer["name"], chosen[layer["name"]]) for layer in report["layers"]
                   if layer["kind"] == "activation" and layer["name"] in chosen]
    return layer_bits, activations


def _epoch_seconds(stdout, batch_images):
    rates = [int(m.group(1)) for m in map(IMG_PER_S.match, stdout.splitlines()) if m and int(m.group(1)) > 0]
    return batch_images / statistics.median(rates) if rates else None


def _kind(method, explicit_bits):
    return "explicit" if explicit_bits is not None else "uniform" if "uniform" in method.split() else "auto"


def run_script_flags(work_dir, budget, method, seed, plan, extra=None, grid_flags=()):
    """The run-script flags of run_row's row (arguments as run_row's)."""
    row_label = "%s %s" % (budget.label, method)
    # The accuracy table's layout and shared flags; a row's flags hold no spaces (op names are escaped regexes).
    row = accuracy_table.Row(row_label, " ".join(row_flags(budget, _kind(method, extra), extra) + list(grid_flags)))
    return accuracy_table.run_flags(work_dir, row, seed, plan)


def run_row(work_dir, budget, method, seed, plan, extra=None, grid_flags=()):
    """Fine-tune one row from the seed's float checkpoint; returns (its entry, its run directory).

    `method` names the row ('auto', 'uniform', 'random 0', 'lsq auto', ...): with explicit bits `extra` it runs
    them, else --uql_auto_bits unless its words hold 'uniform'; `grid_flags` choose the weight grid (default
    min/max)."""
    label = "%s %s" % (budget.label, method)
    out_dir = accuracy_table.row_dir(work_dir, label, seed)
    kind = _kind(method, extra)
    argv = [sys.executable, "-m", accuracy_table.RUN_MODULE] + run_script_flags(work_dir, budget, method, seed, plan,
                                                                                extra, grid_flags)
    seconds, done = stats.timed(lambda: subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True))
    publish.check_run(done, "row %r seed %d" % (label, seed))
    results = publish.load_json(os.path.join(out_dir, "results.json"))
    subset = next((int(f.split("=")[1]) for f in plan["common"] if f.startswith("--train_subset=")), N_TRAIN)
    entry = {"budget": budget.label, "method": method, "seed": seed, "accuracy": results["quant_accuracy"],
             "float_accuracy": results["float_accuracy"], "test_examples": results["test_examples"],
             "ratio": results["compression_ratio"], "seconds": seconds,
             "epoch_seconds": _epoch_seconds(done.stdout, subset)}
    if kind == "auto":
        stored = publish.load_json(os.path.join(out_dir, "bit_allocation.json"))
        entry["search_seconds"] = stored["search_seconds"]
        entry["mean_bits"] = {part: stored[part]["mean_bits"] for part in ("weight", "activation") if part in stored}
    return entry, out_dir


def run_budget(work_dir, budget, seed, plan):
    """Auto, uniform and plan['randoms'] random rows of one budget and seed."""
    auto, auto_dir = run_row(work_dir, budget, "auto", seed, plan)
    entries = [auto, run_row(work_dir, budget, "uniform", seed, plan)[0]]
    entries[1]["mean_bits"] = {"weight": math.floor(budget.weight_bits)}
    stored = publish.load_json(os.path.join(auto_dir, "bit_allocation.json"))
    report = publish.load_json(os.path.join(auto_dir, "quant_report.json"))
    rng = np.random.default_rng(1000 * seed + BUDGETS.index(budget))
    for index in range(plan["randoms"]):
        bits, means = random_allocation(stored, report, budget, rng)
        entry = run_row(work_dir, budget, "random %d" % index, seed, plan, bits)[0]
        entry["mean_bits"], entry["bits"] = means, bits[0]
        entries.append(entry)
    return entries


def run_timing(work_dir, budget, seed, plan, repeats=1, quick=False):
    """Search and epoch seconds of `budget`'s auto row, measured from scratch `repeats` times (a leftover run
    directory would be resumed and reuse its stored allocation, so it is removed before each); the entry holds
    every run's figures and their medians (one run of ~10 s varies by more than a second on this machine).
    The end load is read once the run's own load has faded, or at once when `quick` (as a --quick run's)."""
    label = "%s auto timing" % budget.label
    load_before = machine.read_load()
    searches, epochs = [], []
    for _ in range(repeats):
        shutil.rmtree(accuracy_table.row_dir(work_dir, label, seed), ignore_errors=True)
        entry = run_row(work_dir, budget, "auto timing", seed, plan)[0]
        searches.append(entry["search_seconds"])
        epochs.append(entry["epoch_seconds"])
    measured = [e for e in epochs if e is not None]
    return {"budget": budget.label, "seed": seed, "search_seconds": statistics.median(searches),
            "epoch_seconds": statistics.median(measured) if measured else None, "search_runs": searches,
            "epoch_runs": epochs, "load_before": load_before, "load_after": machine.end_load(quick),
            "date": machine.machine_info()["date"]}


def merge_timing(existing, new_timing):
    """The timing entries of `existing` (a payload or None) with `new_timing` replacing those of its budgets."""
    merged = {t["budget"]: t for t in (existing or {}).get("timing", [])}
    merged.update({t["budget"]: t for t in new_timing})
    labels = [b.label for b in BUDGETS]
    return sorted(merged.values(), key=lambda t: labels.index(t["budget"]))


def merge(existing, new_entries, plan, path):
    """(entries, budgets) of the results file `existing` (a payload or None) updated with new_entries.

    Parts of the benchmark (budgets, seeds, more random allocations) run separately merge by (budget, method,
    seed); a rerun replaces its entries. Raises BenchmarkError when `existing` was run with another plan
    (epochs, flags), or when the rows of one budget and seed would come from different float checkpoints (their
    comparison would mean nothing: a float checkpoint retrained on another machine differs).
    """
    def fixed(p):
        return {k: v for k, v in p.items() if k not in ("budgets", "randoms")}

    if existing is not None and (existing.get("quick") or fixed(existing["plan"]) != fixed(plan)):
        raise publish.BenchmarkError("--output=%s holds results of another plan (%s); expected %s: choose another "
                                     "--output" % (path, fixed(existing["plan"]), fixed(plan)))
    merged = {(e["budget"], e["method"], e["seed"]): e for e in (existing or {}).get("entries", [])}
    merged.update({(e["budget"], e["method"], e["seed"]): e for e in new_entries})
    labels = [b.label for b in BUDGETS]
    method_order = lambda m: (m != "auto", m != "uniform", m)  # noqa: E731
    entries = sorted(merged.values(), key=lambda e: (labels.index(e["budget"]), e["seed"], method_order(e["method"])))
    # Rows are compared within one budget, seed and family (the min/max rows; the LSQ rows), so each family of a
    # budget and seed must share one float checkpoint; the two families may come from different ones.
    for budget, seed, lsq in sorted({(e["budget"], e["seed"], is_lsq(e)) for e in entries}):
        floats = sorted({e["float_accuracy"] for e in entries
                         if (e["budget"], e["seed"], is_lsq(e)) == (budget, seed, lsq)})
        if len(floats) > 1:
            raise publish.BenchmarkError("%s: the %srows of %s, seed %d would come from float checkpoints of "
                                         "different accuracies %s; expected one float checkpoint per budget and "
                                         "seed: rerun every method of that budget and seed together"
                                         % (path, "LSQ " if lsq else "", budget, seed, floats))
    budgets = [label for label in labels if any(e["budget"] == label for e in entries)]
    return entries, budgets


def is_lsq(entry):
    """Whether a results entry is one of benchmarks.bit_allocation_lsq's rows."""
    return entry["method"].startswith(LSQ_PREFIX)


def check_float_checkpoints(existing, work_dir, seeds, budgets, path, lsq=False):
    """Refuse, before any run, a seed whose rows of `budgets` in `existing` (of the family run: LSQ rows when `lsq`,
    else the min/max rows) were fine-tuned from a float checkpoint `work_dir` lacks: its first row would train a
    new one, and merge would refuse the rows after they all ran."""
    stored = {e["seed"] for e in (existing or {}).get("entries", []) if e["budget"] in budgets and is_lsq(e) == lsq}
    missing = [seed for seed in seeds if seed in stored
               and not os.path.exists(os.path.join(accuracy_table.float_dir(work_dir, seed), "checkpoint"))]
    if missing:
        raise publish.BenchmarkError("--work_dir=%s has no float checkpoint of seed %s, whose rows in %s were "
                                     "fine-tuned from one; expected the --work_dir those rows ran in (its "
                                     "seed<N>/float)" % (work_dir, ",".join(map(str, missing)), path))


def summarize(entries, timing=()):
    """Per budget: auto, uniform and best-random accuracy (means over seeds), search and epoch seconds (from
    the budget's --timing entry when there is one, else the accuracy rows' means); the LSQ rows are
    benchmarks.bit_allocation_lsq's."""
    timed = {t["budget"]: t for t in timing}
    table = {}
    for label in [b.label for b in BUDGETS]:
        mine = [e for e in entries if e["budget"] == label and not is_lsq(e)]
        if not any(e["method"] == "auto" for e in mine):
            continue
        seeds = sorted({e["seed"] for e in mine})
        randoms = [[e["accuracy"] for e in mine if e["seed"] == s and e["method"].startswith("random")] for s in seeds]
        best_random = [max(accuracies) for accuracies in randoms]
        pick = lambda method: [e for e in mine if e["method"] == method]  # noqa: E731
        table[label] = {
            "seeds": seeds, "randoms": [len(accuracies) for accuracies in randoms],
            "auto": stats.mean_std(e["accuracy"] for e in pick("auto")),
            "uniform": stats.mean_std(e["accuracy"] for e in pick("uniform")),
            "best_random": stats.mean_std(best_random),
            "search_seconds": statistics.mean(e["search_seconds"] for e in pick("auto")),
            # Any row that trained in this run (a resumed row has no epoch time); every row fine-tunes the same
            # model at the same budget.
            "epoch_seconds": statistics.mean([e["epoch_seconds"] for e in mine if e.get("epoch_seconds")] or [0.0]),
        }
        if label in timed:
            table[label].update(search_seconds=timed[label]["search_seconds"],
                                epoch_seconds=timed[label]["epoch_seconds"] or 0.0)
    return table


def render(payload, command):
    table = summarize(payload["entries"], payload.get("timing", []))
    rows = []
    for label, t in table.items():
        rows.append((label, ",".join(map(str, t["seeds"])), ",".join(map(str, t["randoms"])),
                     accuracy_table.percent(*t["auto"]),
                     accuracy_table.percent(*t["uniform"]), accuracy_table.percent(*t["best_random"]),
                     "%.1f" % t["search_seconds"], "%.1f" % t["epoch_seconds"] if t["epoch_seconds"] else "-",
                     "%.1f %%" % (100 * t["search_seconds"] / t["epoch_seconds"]) if t["epoch_seconds"] else "-"))
    lines = ["## Bit allocation (ResNet-20, Fashion-MNIST, all 10,000 test images)", "",
             "Command (the last part run; parts merge by budget, method and seed): `%s`" % command, ""]
    lines += machine.machine_lines(payload["machine"], payload["load_before"])
    lines += ["- Every row fine-tunes its seed's float checkpoint for --uql_quant_epochs=%s; first and last layers "
              "float. Best random: per seed, the best of that seed's random allocations at the same budget ('randoms': "
              "how many, per seed). Auto and random weight widths range from %s to 8 bits; uniform is the widest "
              "width within the budget."
              % (payload["plan"]["epochs"],
                 " or ".join("%d (%s)" % (m, ", ".join(b.label for b in BUDGETS if b.weight_bit_min == m))
                             for m in sorted({b.weight_bit_min for b in BUDGETS}))), "",
              publish.markdown_table(("budget", "seeds", "randoms", "auto %", "uniform %", "best random %",
                                      "search s", "epoch s", "search / epoch"), rows), ""]
    for seed in sorted({e["seed"] for e in payload["entries"]}):
        floats = {}
        for e in payload["entries"]:
            if e["seed"] == seed and not is_lsq(e):
                floats.setdefault(e["float_accuracy"], []).append(e["budget"])
        if len(floats) > 1:
            lines.append("- Seed %d's float checkpoint is not the same in every budget (%s; retrained on another "
                         "machine): rows are compared only within one budget and seed, which share one." % (
                             seed, "; ".join("%s: %.2f %%" % (", ".join(dict.fromkeys(budgets)), 100 * accuracy)
                                             for accuracy, budgets in floats.items())))
    timing = payload.get("timing", [])
    if timing:
        busy = any(machine.busy_readings(t["load_before"], t["load_after"], payload["machine"]["cores"])
                   for t in timing)
        lines.append("- Search and epoch times of %s: %s (`--timing`: each budget's auto row again from scratch, seed "
                     "%d; the medians of its runs).%s" % (
                         ", ".join(t["budget"] for t in timing),
                         "**measured on a busy machine** (published with --allow_busy)" if busy else
                         "measured alone, nothing else running", timing[0]["seed"],
                         "" if len(timing) == len(table) else " Other budgets: means over the accuracy rows, which "
                         "ran beside other work."))
        for t in timing:
            runs = ""
            if len(t.get("search_runs", [])) > 1:
                runs = ", %d runs: search %s s, epoch %s s" % (
                    len(t["search_runs"]), ", ".join("%.1f" % v for v in t["search_runs"]),
                    ", ".join("%.1f" % v if v is not None else "-" for v in t["epoch_runs"]))
            lines.append("  - %s: %s%s; load before / after %s / %s." % (t["budget"], t["date"], runs,
                                                                      t["load_before"], t["load_after"]))
    else:
        lines.append("- Search and epoch times: means over the accuracy rows.")
    for label, t in table.items():
        for what, other in (("uniform", t["uniform"][0]), ("best random", t["best_random"][0])):
            met = t["auto"][0] >= other
            lines.append("- Target %s: auto at or above %s: %s (%.2f vs %.2f)."
                         % (label, what, "met" if met else "**not met**", 100 * t["auto"][0], 100 * other))
        limit = SEARCH_LIMITS.get(label, SEARCH_LIMIT)
        lines.append("- Target %s: search at most %g %% of an epoch: %s." % (
            label, 100 * limit, "no row trained in this run (no epoch time)" if not t["epoch_seconds"] else
            ("met" if t["search_seconds"] <= limit * t["epoch_seconds"] else "**not met**")
            + " (%.1f %%)" % (100.0 * t["search_seconds"] / t["epoch_seconds"])))
    from benchmarks import bit_allocation_lsq  # it builds on this module's rows
    return "\n".join(lines + bit_allocation_lsq.render_lines(payload["entries"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser, output_help="results file (default %s; none with --quick)"
                          % os.path.relpath(DEFAULT_RESULTS, publish.REPO_ROOT))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    parser.add_argument("--work_dir", default="/tmp/tfquant_bit_allocation", help="checkpoints and logs")
    parser.add_argument("--budgets", help="comma-separated subset of %s (default: all; quick: %s)"
                        % (", ".join(repr(b.label) for b in BUDGETS), ", ".join(QUICK["budgets"])))
    parser.add_argument("--timing", action="store_true", help="measure each budget's search and epoch time "
                        "alone (one auto row per budget, first seed) into the results file; run on a quiet machine")
    parser.add_argument("--timing_repeats", type=int, default=1, help="--timing: auto rows per budget, the medians "
                        "of their times recorded (default 1)")
    parser.add_argument("--randoms", type=int, help="random allocations per budget and seed (default %d; quick %d)"
                        % (FULL["randoms"], QUICK["randoms"]))
    parser.add_argument("--weight_grid", choices=("minmax", "lsq"), default="minmax", help="minmax: the auto, "
                        "uniform and random rows (default); lsq: the LSQ rows of benchmarks.bit_allocation_lsq (auto, "
                        "auto measured on min/max, uniform; 3-bit budgets only)")
    args = parser.parse_args(argv)
    if args.render_json:
        payload = publish.load_full_run(args.render_json)
        command = payload.get("command", "(not recorded in %s)" % args.render_json)
        publish.write_section(SECTION, render(payload, command), args.markdown)
        return payload
    seeds = accuracy_table.parse_seeds(args.seeds)
    plan = dict(QUICK if args.quick else FULL)
    if args.budgets is not None:
        chosen = [label.strip() for label in args.budgets.split(",")]
        unknown = [label for label in chosen if label not in [b.label for b in BUDGETS]]
        if unknown or not chosen:
            raise publish.BenchmarkError("--budgets=%s is not valid; expected a comma-separated subset of %s"
                                         % (args.budgets, ", ".join(b.label for b in BUDGETS)))
        plan["budgets"] = chosen
    if args.randoms is not None:
        if args.randoms < 1:
            raise publish.BenchmarkError("--randoms=%d is not valid; expected at least 1" % args.randoms)
        plan["randoms"] = args.randoms
    from benchmarks import bit_allocation_lsq  # it builds on this module's rows
    lsq = args.weight_grid == "lsq"
    if lsq:
        bit_allocation_lsq.check_arguments(args, plan)
    if args.timing_repeats < 1:
        raise publish.BenchmarkError("--timing_repeats=%d is not valid; expected at least 1" % args.timing_repeats)
    output = args.output or (None if args.quick else DEFAULT_RESULTS)
    existing = publish.load_json(output) if output and os.path.exists(output) and not args.quick else None
    merge(existing, [], plan, output)  # refuse a results file of another plan before any run
    check_float_checkpoints(existing, args.work_dir, seeds, plan["budgets"], output, lsq)
    load_before = publish.start(args)
    if args.timing:
        return _run_timing(args, existing, output, seeds[0], plan)
    entries = []
    for seed in seeds:
        for budget in (b for b in BUDGETS if b.label in plan["budgets"]):
            for entry in (bit_allocation_lsq.run_budget if lsq else run_budget)(args.work_dir, budget, seed, plan):
                entries.append(entry)
                print("seed %d %-8s %-9s %.4f" % (seed, entry["budget"], entry["method"], entry["accuracy"]),
                      flush=True)
    end_info = machine.machine_info(load=machine.end_load(args.quick))
    if not args.quick:
        entries, plan["budgets"] = merge(existing, entries, plan, output)
    payload = {"quick": args.quick, "plan": plan, "machine": end_info, "load_before": load_before,
               "entries": entries, "command": publish.command_line(),
               "timing": merge_timing(existing if not args.quick else None, [])}
    if output:
        publish.write_json(output, payload)
    if not args.quick:
        publish.publish(SECTION, render(payload, publish.command_line()), args.markdown, load_before,
                        payload["machine"]["load_average"], args.allow_busy)
    return payload


def _run_timing(args, existing, output, seed, plan):
    """--timing: one auto row per chosen budget, alone; merged into the results file's timing entries."""
    if existing is None and not args.quick:
        raise publish.BenchmarkError("--timing needs the accuracy rows' results in %s first; expected a file a "
                                     "full run of benchmarks.bit_allocation wrote" % output)
    timing = []
    for budget in (b for b in BUDGETS if b.label in plan["budgets"]):
        entry = run_timing(args.work_dir, budget, seed, plan, args.timing_repeats, args.quick)
        print("timing %-8s search %.1f s, epoch %.1f s" % (budget.label, entry["search_seconds"],
                                                          entry["epoch_seconds"] or 0.0), flush=True)
        publish.check_quiet(entry["load_before"], entry["load_after"], args.allow_busy or args.quick)
        timing.append(entry)
    if args.quick:
        return {"quick": True, "timing": timing}
    payload = dict(existing, timing=merge_timing(existing, timing))
    publish.write_json(output, payload)
    publish.write_section(SECTION, render(payload, payload["command"]), args.markdown)
    return payload


if __name__ == "__main__":
    publish.run_main(main)
