"""Truncated SVD factorizations of a weight ``W`` (N, K) into ``up @ down`` (N, r) @ (r, K). Pure math.

Plain: ``W = U diag(s) V^T``; keeping the top ``r`` singular triplets minimises ``||W - W_r||_F``
and the squared error is exactly the sum of the discarded ``s_i^2`` (Eckart-Young).

Activation-aware (SVD-LLM, Wang et al. 2024): the layer's output error on inputs ``X`` (T, K) is
``||X (W - W')^T||_F^2 = ||(W - W') S||_F^2`` with ``X^T X = S S^T`` (Cholesky, S lower triangular).
Truncating the SVD of ``W S`` to rank ``r`` and mapping back with ``S^-1`` minimises that output
error, and the error equals the sum of the discarded squared singular values of ``W S``.

Both split the singular values evenly: ``up = U_r diag(sqrt s_r)``, ``down = diag(sqrt s_r) V_r^T (S^-1)``.
All decompositions run in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Factors:
    up: torch.Tensor  # (N, r) float64
    down: torch.Tensor  # (r, K) float64
    singular_values: torch.Tensor  # (min(N, K),) float64: all of them, of W or of W S
    discarded_energy: float  # sum of the discarded squared singular values (the squared error bound)


def max_useful_rank(n: int, k: int) -> int:
    """Largest rank whose factors hold fewer parameters than the dense (N, K) weight."""
    return max((n * k - 1) // (n + k), 0)


def rank_for_ratio(n: int, k: int, ratio: float) -> int:
    """Largest rank with ``r * (N + K) <= ratio * N * K`` (at least 1)."""
    return max(1, min(int(math.floor(ratio * n * k / (n + k))), min(n, k)))


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` of ``sum(s^2)`` (s sorted descending)."""
    e = s.double().square()
    total = float(e.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(e, 0) / total
    # 1e-12: cumulative sums of float64 can fall a hair short of 1.0 for energy=1.0
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1


def cholesky_whitening(xtx: torch.Tensor, damp: float = 0.01, tries: int = 6) -> tuple[torch.Tensor, float]:
    """Lower-triangular ``S`` with ``S S^T = X^T X + d I`` (float64) and the ``d`` used.

    ``d`` starts at ``damp * mean(diag)`` and grows 10x per failed factorization (rank-deficient
    activations: fewer tokens than features, dead inputs). Raises ``torch.linalg.LinAlgError``
    only if even the last try fails."""
    h = xtx.double()
    mean_diag = float(h.diagonal().mean())
    if mean_diag <= 0 or not math.isfinite(mean_diag):
        mean_diag = 1.0
    d = damp * mean_diag
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    for attempt in range(tries):
        s, info = torch.linalg.cholesky_ex(h + d * eye)
        if int(info) == 0:
            return s, d
        d = max(d, 1e-6 * mean_diag) * 10
    raise torch.linalg.LinAlgError(f"X^T X is not positive definite even with damping {d:g}")


def _split(u, s, vh, r):
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def svd_factors(w: torch.Tensor, rank: int) -> Factors:
    """Rank-``rank`` truncation of ``w`` (N, K)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = min(rank, s.numel())
    up, down = _split(u, s, vh, r)
    return Factors(up, down, s, float(s[r:].square().sum()))


def whitened_singular_values(w: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.double() @ chol)


def whitened_svd_factors(w: torch.Tensor, chol: torch.Tensor, rank: int) -> Factors:
    """Rank-``rank`` truncation minimising ``||(W - up @ down) S||_F`` for ``chol`` = S (K, K) lower."""
    u, s, vh = torch.linalg.svd(w.double() @ chol, full_matrices=False)
    r = min(rank, s.numel())
    up, down_w = _split(u, s, vh, r)
    # down = down_w @ S^-1, i.e. solve down @ S = down_w (S lower triangular)
    down = torch.linalg.solve_triangular(chol, down_w, upper=False, left=False)
    return Factors(up, down, s, float(s[r:].square().sum()))


def allocate_ranks(spectra: list[torch.Tensor], shapes: list[tuple[int, int]], budget: int) -> list[int]:
    """Ranks per layer with ``sum r_i (N_i + K_i) <= budget`` that remove the most relative error.

    Adding rank ``j`` to layer ``i`` removes ``s_ij^2 / sum_j s_ij^2`` of its (relative) squared error
    at a cost of ``N_i + K_i`` parameters; the gains fall with ``j``, so taking candidates by gain per
    parameter, best first, is the greedy optimum of this separable problem. Every layer gets at least
    rank 1 and at most :func:`max_useful_rank` (beyond that the dense layer would be smaller)."""
    gains, owners, costs = [], [], []
    ranks = [1] * len(spectra)
    spent = 0
    for i, (s, (n, k)) in enumerate(zip(spectra, shapes)):
        e = s.double().square()
        total = float(e.sum())
        cap = max(max_useful_rank(n, k), 1)
        spent += n + k  # the rank-1 floor
        rel = (e / total if total > 0 else torch.zeros_like(e))[1:cap]
        gains.append(rel / (n + k))
        owners.append(torch.full((rel.numel(),), i, dtype=torch.long))
        costs.append(torch.full((rel.numel(),), n + k, dtype=torch.long))
    if not gains:
        return []
    g, own, cost = torch.cat(gains), torch.cat(owners), torch.cat(costs)
    order = torch.sort(g, descending=True, stable=True).indices  # stable: a layer's ranks stay in order
    take = torch.cumsum(cost[order], 0) <= (budget - spent)
    counts = torch.bincount(own[order][take], minlength=len(spectra))
    return [r + int(c) for r, c in zip(ranks, counts)]
