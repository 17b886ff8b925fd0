"""Interleaved timing rounds that go on until every mode's time ratio to a reference mode is known to a set
precision, or a budget of rounds or seconds runs out.

Round r runs `steps_per_round` steps of every mode, starting at mode r mod n (so no mode always follows the
same one); a mode's round ratio is its round median over the reference's round median in the same round, so load
from other processes and clock drift hit both sides of each ratio alike. A ratio's figure is the mean of its
round ratios with the 95 % t-interval of that mean.
"""
import dataclasses
import time

from benchmarks import stats


@dataclasses.dataclass
class Budget:
    """When to stop: after min_rounds, once every interval is within +-precision of its ratio (relative), or at
    max_rounds or after max_seconds, whichever comes first (never before 2 rounds: an interval needs
    two)."""

    min_rounds: int
    max_rounds: int
    max_seconds: float
    precision: float = 0.02


def interval(round_ratios):
    """{'ratio', 'low', 'high', 'half_width'} of a list of round ratios (the 95 % interval of their mean);
    with fewer than 2 rounds the interval is unbounded (low 0, high inf)."""
    if len(round_ratios) < 2:
        mean = round_ratios[0] if round_ratios else float("nan")
        return {"ratio": mean, "low": 0.0, "high": float("inf"), "half_width": float("inf")}
    mean, low, high = stats.mean_interval(round_ratios)
    return {"ratio": mean, "low": low, "high": high, "half_width": (high - low) / 2.0}


def round_ratios(per_round, name, reference):
    """Round medians of `name` over those of `reference`, round by round."""
    return [m / r for m, r in zip(per_round[name], per_round[reference])]


def widest(per_round, reference):
    """(relative half-width, mode) of the least precise ratio to `reference`."""
    worst = (0.0, None)
    for name in per_round:
        if name == reference:
            continue
        found = interval(round_ratios(per_round, name, reference))
        worst = max(worst, (found["half_width"] / found["ratio"], name), key=lambda pair: pair[0])
    return worst


def run(steps, reference, steps_per_round, budget, log, clock=time.perf_counter, cpu_clock=time.process_time):
    """Time every mode's steps in interleaved rounds until the budget says stop.

    Args:
      steps: ordered {mode: callable running one step}; must contain `reference`.
      reference: the mode every ratio divides by.
      steps_per_round: steps of each mode per round.
      budget: a Budget.
      log: callable taking one progress line.
      clock, cpu_clock: the wall and process-CPU clocks (seconds).
    Returns:
      {'times_s', 'cpu_times_s': {mode: per-step list in run order}, 'per_round', 'cpu_per_round': {mode: round
      medians}, 'rounds', 'seconds', 'reached' (bool), 'widest' (relative half-width, mode)}.
    """
    names = list(steps)
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    per_round = {name: [] for name in names}
    cpu_per_round = {name: [] for name in names}
    start = clock()
    rounds, reached, worst = 0, False, (float("inf"), None)
    while rounds < budget.max_rounds:
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = [], []
            for _ in range(steps_per_round):
                wall0, cpu0 = clock(), cpu_clock()
                steps[name]()
                cpu.append(cpu_clock() - cpu0)
                wall.append(clock() - wall0)
            times[name].extend(wall)
            cpu_times[name].extend(cpu)
            per_round[name].append(stats.median(wall))
            cpu_per_round[name].append(stats.median(cpu))
        rounds += 1
        worst = widest(per_round, reference)
        elapsed = clock() - start
        log("round %d: widest 95%% interval +-%.1f%% (%s), %.0f s" % (rounds, 100 * worst[0], worst[1], elapsed))
        if rounds >= max(2, budget.min_rounds) and worst[0] <= budget.precision:
            reached = True
            break
        if elapsed >= budget.max_seconds and rounds >= 2:
            break
    return {"times_s": times, "cpu_times_s": cpu_times, "per_round": per_round, "cpu_per_round": cpu_per_round,
            "rounds": rounds, "seconds": clock() - start, "reached": reached,
            "widest": [worst[0], worst[1]]}
