"""Exact per-layer bit allocation under a storage budget: a multiple-choice knapsack solved by dynamic programming.

Each layer (a weight tensor, or an activation) takes one bit width from its own set; choosing b bits for a
tensor of n elements costs b*n storage bits and adds the layer's sensitivity at b bits to the objective.
The solver minimises the summed sensitivity subject to sum(b*n) <= floor(equivalent_bits * sum(n)), PocketFlow's
definition of an equivalent-bits budget.

Why the dynamic programme is exact, not an approximation: every cost b*n is a multiple of g = gcd of all n,
so with costs and budget divided by g (the budget rounded down, which cannot exclude a feasible choice since
every cost is an integer number of units) the table indexes every reachable cost exactly. Costs are further
taken relative to each layer's smallest width, which shrinks the table without changing which choices fit.

Weights and activations have separate budgets on separate variables and the objective is a sum of per-tensor
terms, so the joint optimum is the pair of the two separate optima: each is solved by `solve`.
"""
import dataclasses
import fractions
import math
from typing import Dict, Mapping

import numpy as np

from tfquant.errors import TfquantError

# Table cells (layers x budget units) above which `solve` refuses rather than exhausting memory.
MAX_TABLE_CELLS = 50_000_000


class AllocationError(TfquantError, ValueError):
    """No allocation fits the budget, or the problem is malformed or too large to solve exactly."""


@dataclasses.dataclass(frozen=True)
class AllocationItem:
    """One tensor to allocate: its name, size in elements and sensitivity per candidate bit width.

    Attributes:
      name: a unique key (a weight variable's name or an activation op's name).
      size: elements (of a weight), or elements per example (of an activation); a positive integer.
      sensitivities: {bits: estimated loss increase at that width}; finite numbers.
    """

    name: str
    size: int
    sensitivities: Mapping[int, float]


@dataclasses.dataclass
class Allocation:
    """The solver's answer.

    Attributes:
      bits: {item name: chosen bits}.
      objective: the summed sensitivity of the choice.
      budget_bits: the largest allowed sum of bits * size.
      used_bits: sum of bits * size of the choice (never above budget_bits).
      total_size: sum of the sizes.
    """

    bits: Dict[str, int]
    objective: float
    budget_bits: int
    used_bits: int
    total_size: int

    @property
    def mean_bits(self):
        """Bits per element of the choice, weighted by size."""
        return self.used_bits / self.total_size


def budget_bits(total_size, equivalent_bits):
    """floor(equivalent_bits * total_size), with equivalent_bits read as the decimal it prints as.

    Args:
      total_size: sum of the item sizes.
      equivalent_bits: the mean bits allowed (e.g. 2.5).
    Returns:
      the storage budget in bits, an int.
    """
    # 2.3 as a binary float is 2.2999...; the user meant the decimal, and the floor must not lose a unit.
    return math.floor(fractions.Fraction(repr(float(equivalent_bits))) * total_size)


def _checked_items(items):
    names = set()
    for item in items:
        if item.name in names:
            raise AllocationError("item %r is listed twice; expected unique names" % item.name)
        names.add(item.name)
        if isinstance(item.size, bool) or not isinstance(item.size, (int, np.integer)) or item.size < 1:
            raise AllocationError("item %r has size %r; expected a positive integer" % (item.name, item.size))
        if not item.sensitivities:
            raise AllocationError("item %r has no candidate bit widths" % item.name)
        for bits, value in item.sensitivities.items():
            if not math.isfinite(value):
                raise AllocationError("item %r has sensitivity %r at %d bits; expected a finite number"
                                      % (item.name, value, bits))
    return list(items)


def solve(items, equivalent_bits, max_table_cells=MAX_TABLE_CELLS):
    """The allocation of least summed sensitivity whose storage fits `equivalent_bits` per element.

    Args:
      items: AllocationItems (at least one).
      equivalent_bits: the budget as mean bits per element, weighted by size.
      max_table_cells: refuse problems whose table would be larger (AllocationError).
    Returns:
      an Allocation; among equally good choices the one found first with narrower widths earlier wins,
      so the same input always gives the same bits.
    Raises:
      AllocationError: no choice fits (the message gives the smallest possible mean bits), or bad input.
    """
    items = _checked_items(items)
    if not items:
        raise AllocationError("no layer to allocate; expected at least one")
    total = sum(int(item.size) for item in items)
    budget = budget_bits(total, equivalent_bits)
    unit = 0
    for item in items:
        unit = math.gcd(unit, int(item.size))
    options = [sorted(item.sensitivities) for item in items]
    smallest = sum(bits[0] * int(item.size) for bits, item in zip(options, items))
    if smallest > budget:
        raise AllocationError("equivalent bits %s allow %d storage bits, but the narrowest widths already need %d "
                              "(mean %.4f bits); expected a budget of at least that"
                              % (equivalent_bits, budget, smallest, smallest / total))
    # Extra cost of each option over the layer's narrowest one, in units of `unit` elements-bits.
    extras = [[(bits - choices[0]) * (int(item.size) // unit) for bits in choices]
              for choices, item in zip(options, items)]
    capacity = min((budget - smallest) // unit, sum(extra[-1] for extra in extras))
    if (capacity + 1) * len(items) > max_table_cells:
        raise AllocationError("the exact allocation table would have %d cells; expected at most %d (coarser layer "
                              "sizes or fewer layers)" % ((capacity + 1) * len(items), max_table_cells))
    # best[c]: least objective of the items so far with extra cost at most c (all zero before any item).
    best = np.zeros(capacity + 1)
    choices_taken = []
    for item, choices, extra in zip(items, options, extras):
        new_best = np.full(capacity + 1, np.inf)
        taken = np.zeros(capacity + 1, dtype=np.int16)
        for index, (bits, cost) in enumerate(zip(choices, extra)):
            if cost > capacity:
                break
            candidate = np.full(capacity + 1, np.inf)
            candidate[cost:] = best[:capacity + 1 - cost] + float(item.sensitivities[bits])
            better = candidate < new_best
            new_best[better] = candidate[better]
            taken[better] = index
        best = new_best
        choices_taken.append(taken)
    remaining = capacity
    chosen = {}
    for item, choices, extra, taken in reversed(list(zip(items, options, extras, choices_taken))):
        index = int(taken[remaining])
        chosen[item.name] = choices[index]
        remaining -= extra[index]
    bits = {item.name: chosen[item.name] for item in items}
    used = sum(bits[item.name] * int(item.size) for item in items)
    objective = float(sum(float(item.sensitivities[bits[item.name]]) for item in items))
    return Allocation(bits=bits, objective=objective, budget_bits=budget, used_bits=used, total_size=total)
