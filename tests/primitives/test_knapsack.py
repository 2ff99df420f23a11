"""The multiple-choice knapsack against brute force (every combination enumerated) on small random
instances: the optimum must be equal, exactly."""

import itertools
import math
import random

import pytest

from torchcompress.primitives.knapsack import Infeasible, solve_mckp


def brute_force(costs, losses, budget):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(costs[i][j] for i, j in enumerate(combo))
        if cost > budget or any(math.isinf(losses[i][j]) for i, j in enumerate(combo)):
            continue
        loss = math.fsum(losses[i][j] for i, j in enumerate(combo))
        if best is None or loss < best:
            best = loss
    return best


def random_instance(rng, integer_losses):
    n = rng.randint(1, 6)
    costs = [[rng.randint(0, 40) * rng.choice([1, 3, 64]) for _ in range(rng.randint(1, 4))] for _ in range(n)]
    losses = [[float(rng.randint(0, 50)) if integer_losses else rng.random() * 10 for _ in c] for c in costs]
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    return costs, losses, rng.randint(lo, hi + 5)


@pytest.mark.parametrize("integer_losses", [True, False])
def test_equals_brute_force(integer_losses):
    rng = random.Random(1234 + integer_losses)
    for _ in range(300):
        costs, losses, budget = random_instance(rng, integer_losses)
        r = solve_mckp(costs, losses, budget)
        assert r.exact
        assert r.cost <= budget
        assert r.cost == sum(costs[i][j] for i, j in enumerate(r.choice))
        # integer losses: sums are exact in float64, so the optimum must be equal bit for bit; random
        # float losses: the DP's choice re-summed with fsum equals brute force's fsum minimum
        assert r.loss == brute_force(costs, losses, budget), (costs, losses, budget, r)


def test_inf_options_never_chosen_and_infeasible_budget():
    costs, losses = [[1, 5], [2, 4]], [[math.inf, 1.0], [3.0, 0.5]]
    r = solve_mckp(costs, losses, 9)
    assert r.choice == [1, 1] and r.loss == 1.5
    r = solve_mckp(costs, losses, 7)  # item 0 must take option 1 (5 bytes): item 1 only fits option 0
    assert r.choice == [1, 0] and r.loss == 4.0
    with pytest.raises(Infeasible):
        solve_mckp(costs, losses, 6)


def test_coarse_grid_stays_within_budget():
    """With more DP cells needed than allowed, costs are rounded up: never over the budget, and the
    loss is no better than the exact optimum (the exact solve is the reference)."""
    rng = random.Random(7)
    for _ in range(100):
        costs, losses, budget = random_instance(rng, False)
        costs = [[c * 1000 + rng.randint(0, 999) for c in cs] for cs in costs]  # costs without a common factor
        budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs) + 500)
        exact = solve_mckp(costs, losses, budget)
        coarse = solve_mckp(costs, losses, budget, max_cells=8)
        assert coarse.cost <= budget
        assert coarse.loss >= exact.loss
        assert exact.loss == brute_force(costs, losses, budget)


def test_more_budget_never_worse():
    rng = random.Random(3)
    costs, losses, _ = random_instance(rng, False)
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    prev = math.inf
    for b in range(lo, hi + 1, max(1, (hi - lo) // 50)):
        r = solve_mckp(costs, losses, b)
        assert r.loss <= prev
        prev = r.loss
