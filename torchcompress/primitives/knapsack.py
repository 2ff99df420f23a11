"""Multiple-choice knapsack, solved exactly by dynamic programming over the byte budget.

Item ``i`` (a layer) takes exactly one of its options ``j`` (a bit width / group size, a GGUF block
type), which costs ``costs[i][j]`` bytes (integers) and predicts ``losses[i][j]`` (a float, ``inf``
for an option the item cannot take). :func:`solve_mckp` returns the choice minimising the summed loss
with the summed cost at most ``budget``.

The DP runs over the *slack*: each item's cheapest option is always paid, so only the extra bytes
``costs[i][j] - min_j costs[i][j]`` compete for ``budget - sum_i min_j costs[i][j]``. Costs are
divided by the greatest common divisor of all extra costs (SmolLM2's layer sizes share factors of
64 and more), which keeps the optimum exact. If the grid would still exceed ``max_cells`` cells,
extra costs are rounded *up* to a coarser unit: the plan still fits the budget (never over it), and
``exact`` is False (the optimum is then that of the rounded problem; the reports say so).

    >>> r = solve_mckp([[1, 2], [1, 3]], [[5.0, 1.0], [4.0, 1.0]], budget=4)
    >>> r.choice, r.loss, r.cost
    ([1, 0], 5.0, 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np


@dataclass(frozen=True)
class KnapsackResult:
    choice: list[int]  # option index per item
    loss: float  # summed loss of the choice (math.fsum)
    cost: int  # summed cost of the choice (true, not rounded)
    unit: int  # bytes per DP cell (1 or the gcd of the extra costs when exact)
    exact: bool  # True: no cost was rounded, the choice is the optimum of the problem as given


class Infeasible(ValueError):
    """Even the cheapest option of every item exceeds the budget."""

    def __init__(self, minimum: int, budget: int):
        self.minimum, self.budget = minimum, budget
        super().__init__(f"the cheapest choice costs {minimum}, over the budget {budget}")


def solve_mckp(costs: list[list[int]], losses: list[list[float]], budget: int, *,
               max_cells: int = 1 << 17) -> KnapsackResult:
    """The loss-minimising choice of one option per item within ``budget`` (see the module doc)."""
    if any(len(ci) > 255 for ci in costs):
        raise ValueError("at most 255 options per item")
    if len(costs) != len(losses) or any(len(c) != len(l) or not c for c, l in zip(costs, losses)):
        raise ValueError("costs and losses must be lists of the same non-empty option lists")
    c = [np.asarray(ci, dtype=np.int64) for ci in costs]
    l_ = [np.asarray(li, dtype=np.float64) for li in losses]
    if any((ci < 0).any() for ci in c) or any(np.isnan(li).any() for li in l_):
        raise ValueError("costs must be non-negative and losses not NaN")
    # an item's options it cannot take (inf loss) never enter; the cheapest it can take is always paid
    base = [int(ci[np.isfinite(li)].min()) if np.isfinite(li).any() else -1 for ci, li in zip(c, l_)]
    if min(base, default=0) < 0:
        raise ValueError("an item has no option with a finite loss")
    minimum = sum(base)
    budget = int(budget)
    if minimum > budget:
        raise Infeasible(minimum, budget)
    extra = [np.where(np.isfinite(li), ci - b, 0) for ci, li, b in zip(c, l_, base)]
    slack = budget - minimum
    slack = min(slack, sum(int(e[np.isfinite(li)].max()) for e, li in zip(extra, l_)))  # more never helps
    g = reduce(math.gcd, (int(v) for e in extra for v in e if v > 0), 0)
    if g == 0:  # every option of every item costs its item's minimum: pick the least loss
        choice = [int(np.argmin(li)) for li in l_]
        return _result(choice, c, l_, 1, True)
    unit, exact = g, True
    if slack // g + 1 > max_cells:
        unit, exact = -(-slack // (max_cells - 1)), False  # round extra costs up: never over the budget
        exact = all(int(v) % unit == 0 for e in extra for v in e)
    cells = slack // unit + 1
    # dp[b]: least loss of the items so far with extra cost at most b * unit (monotone in b)
    dp = np.zeros(cells, dtype=np.float64)
    args = np.empty((len(c), cells), dtype=np.uint8)
    for i, (e, li) in enumerate(zip(extra, l_)):
        w = -(-e // unit)  # cells of each option, rounded up
        new = np.full(cells, np.inf)
        arg = np.zeros(cells, dtype=np.uint8)
        for j in np.argsort(w, kind="stable"):
            if not np.isfinite(li[j]) or w[j] >= cells:
                continue
            wj = int(w[j])
            cand = dp[: cells - wj] + li[j]
            better = cand < new[wj:]
            new[wj:][better] = cand[better]
            arg[wj:][better] = j
        dp, args[i] = new, arg
    b = cells - 1
    choice = [0] * len(c)
    for i in range(len(c) - 1, -1, -1):
        j = int(args[i, b])
        choice[i] = j
        b -= int(-(-extra[i][j] // unit))
    return _result(choice, c, l_, unit, exact)


def _result(choice, c, l_, unit, exact) -> KnapsackResult:
    return KnapsackResult(choice, math.fsum(float(l_[i][j]) for i, j in enumerate(choice)),
                          int(sum(int(c[i][j]) for i, j in enumerate(choice))), int(unit), exact)
