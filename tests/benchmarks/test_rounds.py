"""The interleaved rounds that run until a ratio is known to +-2 %, their 95 % intervals, and the training-step
targets judged on the interval's upper bound; with fake clocks, so nothing here depends on the machine's speed."""
import math

import pytest

from benchmarks import rounds, stats, train_overhead


def t_cdf(t, df, pieces=20000):
    """Student's t CDF at t >= 0 by Simpson's rule on its density (the reference the table is checked against)."""
    norm = math.gamma((df + 1) / 2.0) / (math.sqrt(df * math.pi) * math.gamma(df / 2.0))

    def density(x):
        return norm * (1.0 + x * x / df) ** (-(df + 1) / 2.0)

    h = t / pieces
    total = density(0.0) + density(t) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, pieces))
    return 0.5 + total * h / 3.0


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 17, 30, 31, 45, 120])
def test_t_quantile_is_the_975_point_of_students_t(df):
    assert t_cdf(stats.t_quantile_975(df), df) == pytest.approx(0.975, abs=1e-4)


def test_mean_interval_is_the_t_interval():
    values = [1.02, 0.98, 1.07, 1.01, 0.99]
    mean, low, high = stats.mean_interval(values)
    std = math.sqrt(sum((v - 1.014) ** 2 for v in values) / 4)
    assert mean == pytest.approx(1.014)
    assert (low, high) == pytest.approx((1.014 - 2.776 * std / math.sqrt(5), 1.014 + 2.776 * std / math.sqrt(5)))
    with pytest.raises(ValueError):
        stats.mean_interval([1.0])


class FakeClocks:
    """Wall and CPU clocks that only the fake steps advance."""

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def step(self, name, durations):
        """A step function for mode `name` that takes the next of its durations (cycled)."""
        count = [0]

        def run():
            self.calls.append(name)
            self.now += durations[count[0] % len(durations)]
            count[0] += 1
        return run


def run_fake(durations, budget, steps_per_round=1):
    clocks = FakeClocks()
    steps = {name: clocks.step(name, d) for name, d in durations.items()}
    lines = []
    timing = rounds.run(steps, "float", steps_per_round, budget, lines.append, clock=lambda: clocks.now,
                        cpu_clock=lambda: clocks.now / 2)
    return timing, clocks, lines


def test_rounds_stop_once_every_interval_is_within_the_precision():
    # Round ratios alternate 1.04 and 1.06: the interval of their mean narrows as 1/sqrt(rounds).
    timing, clocks, lines = run_fake({"float": [1.0], "quant": [1.04, 1.06]}, rounds.Budget(2, 100, 1e9, 0.02))
    assert timing["reached"]
    stopped = timing["rounds"]
    ratios = rounds.round_ratios(timing["per_round"], "quant", "float")
    assert ratios == pytest.approx([1.04, 1.06] * (stopped // 2) + [1.04] * (stopped % 2))
    mean, low, high = stats.mean_interval(ratios)
    assert (high - low) / 2 / mean <= 0.02
    # One round fewer was not yet precise enough (or was below the 2-round minimum).
    if stopped > 2:
        mean, low, high = stats.mean_interval(ratios[:-1])
        assert (high - low) / 2 / mean > 0.02
    assert timing["widest"][1] == "quant" and len(lines) == stopped
    # CPU time is read from its own clock around every step.
    assert timing["cpu_times_s"]["quant"][:2] == pytest.approx([0.52, 0.53])
    # Rounds start at a different mode each time.
    assert clocks.calls[:4] == ["float", "quant", "quant", "float"]


def test_rounds_stop_at_the_round_cap_and_say_the_interval_was_not_reached():
    timing, _, _ = run_fake({"float": [1.0], "quant": [0.7, 1.5, 1.0]}, rounds.Budget(2, 5, 1e9, 0.02))
    assert timing["rounds"] == 5 and not timing["reached"]
    assert timing["widest"][0] > 0.02


def test_rounds_stop_at_the_time_cap_but_never_before_two_rounds():
    timing, _, _ = run_fake({"float": [1.0], "quant": [0.7, 1.5]}, rounds.Budget(1, 100, 0.5, 0.02))
    assert timing["rounds"] == 2 and not timing["reached"]
    timing, _, _ = run_fake({"float": [1.0], "quant": [0.7, 1.5]}, rounds.Budget(1, 100, 9.5, 0.02))
    # Rounds take 1.7 s and 2.5 s in turn: 8.4 s after the fourth, 10.1 s after the fifth, the first past 9.5 s.
    assert timing["rounds"] == 5 and timing["seconds"] == pytest.approx(10.1)


def results_with_ratios(quant_ratios, peer_ratios):
    per_round = {"float": [1.0] * len(quant_ratios), "w4a4-channel": quant_ratios, train_overhead.PEER: peer_ratios}
    return {name: {"round_medians_s": medians} for name, medians in per_round.items()}


def test_a_target_needs_the_intervals_upper_bound_within_the_limit_plus_slack():
    # Mean 1.04 with a tight interval: met; mean 1.04 with an interval reaching past 1.07: missed.
    tight = train_overhead.check_targets(results_with_ratios([1.039, 1.041] * 4, [1.2] * 8))
    loose = train_overhead.check_targets(results_with_ratios([0.96, 1.12] * 4, [1.2, 1.21] * 4))
    channel = [c for c in tight if c["target"].startswith("channel W4A4")][0]
    assert channel["ratio"] == pytest.approx(1.04) and channel["met"]
    channel = [c for c in loose if c["target"].startswith("channel W4A4")][0]
    assert channel["ratio"] == pytest.approx(1.04) and channel["high"] > 1.07 and not channel["met"]
    # Against the peer: the ratio is taken round by round to the peer's own round medians.
    peer = [c for c in loose if c["reference"] == train_overhead.PEER][0]
    assert peer["ratio"] == pytest.approx(sum([0.96 / 1.2, 1.12 / 1.21] * 4) / 8)
    assert peer["met"] == (peer["ratio"] <= 1.0 and peer["high"] <= 1.02)


def test_the_section_says_when_the_precision_was_not_reached_and_the_load():
    args = train_overhead.parse_args(["--quick"])
    timing = {"rounds": 3, "seconds": 12.0, "reached": False, "widest": [0.091, "w4a4-split256"]}
    line = train_overhead.precision_line(timing, args, {"load_average": [3.5, 2.0, 1.0]}, [3.1, 2.0, 1.0])
    assert "Precision not reached" in line and "+-9.1 %" in line and "`w4a4-split256`" in line
    assert "[3.1, 2.0, 1.0]" in line and "[3.5, 2.0, 1.0]" in line
    timing.update(reached=True, widest=[0.015, "w4a4-split256"])
    assert "reached after 3 rounds" in train_overhead.precision_line(timing, args, {"load_average": None}, None)


def test_flags_that_cannot_give_an_interval_are_refused(capsys):
    with pytest.raises(SystemExit) as stopped:
        train_overhead.parse_args(["--max_rounds", "1"])
    assert stopped.value.code == 2
    assert "--max_rounds=1 is not valid" in capsys.readouterr().err
