"""Pruning math as pure functions: tensors in, masks (``True`` = keep) or pruned tensors out.

* magnitude: prune the ``round(sparsity * numel)`` smallest ``|w|`` of one layer, or of several
  layers at once under one global ranking. Ties are broken by position (a stable sort), so the
  count is exact and the result deterministic.
* N:M: in every run of ``m`` consecutive inputs of a row keep the ``n`` largest scores.
* Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||_2``; every output row prunes the same number
  of its inputs (the paper's per-output comparison group).
* SparseGPT (Frantar & Alistarh 2023): with ``H = 2 X X^T / T`` and the upper Cholesky factor ``U``
  of ``(H + damp)^-1``, go through the columns in blocks; choose the block's mask by
  ``w^2 / U_jj^2``, zero the pruned weights one column at a time and spread each column's error
  over the not yet processed columns (the OBS update), lazily across blocks.
* structured importance: L1/L2 norms of output rows or input columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, NumericError
from .gptq import _inverse_cholesky


def check_sparsity(sparsity, field: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(field, f"must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def check_nm(n, m, field: str = "n:m") -> tuple[int, int]:
    for v in (n, m):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(field, f"N and M must be integers, got {n!r}:{m!r}")
    if not 0 < n < m:
        raise ConfigError(field, f"need 0 < N < M, got {n}:{m}")
    return n, m


def _check_weight(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2 or w.numel() == 0:
        raise NumericError(name, f"must be a non-empty 2-D (out_features, in_features) weight, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise NumericError(name, "holds NaN/Inf values; refusing to prune")


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a sparsity prunes (round half to even, as Python's round)."""
    return int(round(sparsity * numel))


def smallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of ``scores``' shape pruning exactly the ``k`` smallest (earliest index wins a tie)."""
    flat = scores.reshape(-1).float()
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep.reshape(scores.shape)


def rowwise_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the ``round(sparsity * K)`` smallest scores of every row."""
    k = prune_count(scores.shape[1], sparsity)
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.argsort(scores.float(), dim=1, stable=True)[:, :k]
        keep.scatter_(1, idx, False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """Keep-mask with ``n`` kept of every ``m`` consecutive inputs of each row (largest scores)."""
    n, m = check_nm(n, m)
    rows, k = scores.shape
    if k % m:
        raise NumericError(name, f"in_features {k} is not a multiple of M={m}; N:M sparsity needs whole groups")
    g = scores.float().reshape(rows, k // m, m)
    idx = torch.argsort(g, dim=2, stable=True)[..., : m - n]  # the m-n smallest of each group
    keep = torch.ones_like(g, dtype=torch.bool).scatter_(2, idx, False)
    return keep.reshape(rows, k)


def magnitude_mask(w: torch.Tensor, sparsity: float = 0.5, *, n: int = 0, m: int = 0, name: str = "weight") -> torch.Tensor:
    """Per-layer magnitude keep-mask: exactly ``round(sparsity * numel)`` zeros, or N:M if ``n``."""
    _check_weight(w, name)
    if n:
        return nm_mask(w.abs(), n, m, name)
    return smallest_mask(w.abs(), prune_count(w.numel(), check_sparsity(sparsity)))


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One ranking of ``|w|`` across all layers: exactly ``round(sparsity * total)`` zeros in total."""
    sparsity = check_sparsity(sparsity)
    if not weights:
        return {}
    for name, w in weights.items():
        _check_weight(w, name)
    flat = torch.cat([w.detach().abs().reshape(-1).float().cpu() for w in weights.values()])
    keep = smallest_mask(flat, prune_count(flat.numel(), sparsity))
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = keep[start:start + w.numel()].reshape(w.shape).to(w.device)
        start += w.numel()
    return out


def wanda_scores(w: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2``; ``act_norm`` (K,) is the L2 norm of each input feature over all tokens."""
    return w.detach().abs().float() * act_norm.float().reshape(1, -1).to(w.device)


def wanda_mask(w: torch.Tensor, act_norm: torch.Tensor, sparsity: float = 0.5, *, n: int = 0, m: int = 0,
               name: str = "weight") -> torch.Tensor:
    """Wanda keep-mask: per output row (unstructured) or per N:M group of a row."""
    _check_weight(w, name)
    if act_norm.shape != (w.shape[1],):
        raise NumericError(f"{name} activation norms", f"expected shape ({w.shape[1]},), got {tuple(act_norm.shape)}")
    if not bool(torch.isfinite(act_norm).all()):
        raise NumericError(f"{name} activation norms", "hold NaN/Inf values (calibration data?)")
    s = wanda_scores(w, act_norm)
    return nm_mask(s, n, m, name) if n else rowwise_mask(s, check_sparsity(sparsity))


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # (N, K) float32, pruned weights zero, the rest updated
    mask: torch.Tensor  # (N, K) bool, True = kept
    damp: float  # damping used (fraction of the mean Hessian diagonal); nan after the fallback
    fallback: bool  # Hessian could not be factored even with more damping: magnitude pruning used


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float = 0.5, *, n: int = 0, m: int = 0,
                    block_size: int = 128, damp: float = 0.01, name: str = "weight") -> SparseGPTResult:
    """SparseGPT on ``w`` (N, K) with the Hessian ``h`` (K, K) of its inputs.

    Unstructured: each block of columns prunes its share of ``round(sparsity * numel)`` (the running
    total is rounded, so the layer's count is exact), choosing the smallest ``w^2 / U_jj^2`` of the
    block (the weights as updated by the earlier blocks). N:M: each group of ``m`` columns picks, per
    row, the ``m - n`` smallest of that score when the group's first column is reached.
    """
    _check_weight(w, name)
    if h.shape != (w.shape[1], w.shape[1]):
        raise NumericError(name, f"SparseGPT needs H ({w.shape[1]}, {w.shape[1]}), got {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()):
        raise NumericError(f"{name} Hessian", "holds NaN/Inf values; refusing to prune")
    if n:
        n, m = check_nm(n, m)
        if w.shape[1] % m:
            raise NumericError(name, f"in_features {w.shape[1]} is not a multiple of M={m}")
        if block_size % m:
            raise ConfigError("block_size", f"must be a multiple of M={m}, got {block_size}")
    else:
        sparsity = check_sparsity(sparsity)
    if block_size < 1:
        raise ConfigError("block_size", f"must be positive, got {block_size}")
    rows, k = w.shape
    W = w.detach().float().clone()
    H = h.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0  # an input that is always zero: its weights do not change the output
    U, used = _inverse_cholesky(H, damp)
    if U is None:
        mask = magnitude_mask(w, sparsity, n=n, m=m, name=name)
        return SparseGPTResult(w.detach().float() * mask, mask, float("nan"), True)
    U = U.float().to(W.device)
    d = torch.diagonal(U)
    mask = torch.ones(rows, k, dtype=torch.bool, device=W.device)
    pruned = 0
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        if not n:
            want = prune_count(rows * i2, sparsity) - pruned  # running total: exact at the end
            score = W1 ** 2 / d[i1:i2].reshape(1, -1) ** 2
            mask[:, i1:i2] = smallest_mask(score, want)
            pruned += want
        for i in range(i2 - i1):
            if n and i % m == 0:
                score = W1[:, i:i + m] ** 2 / d[i1 + i:i1 + i + m].reshape(1, -1) ** 2
                mask[:, i1 + i:i1 + i + m] = nm_mask(score, n, m, name)
            col = W1[:, i]
            q = col * mask[:, i1 + i]
            err = (col - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exactly zero where pruned
            Err[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    return SparseGPTResult(W, mask, used, False)


def row_importance(w: torch.Tensor, p: int = 2) -> torch.Tensor:
    """L1 (``p=1``) or L2 norm of each output row: (N,)."""
    if p not in (1, 2):
        raise ConfigError("norm", f"must be 1 or 2, got {p!r}")
    return torch.linalg.vector_norm(w.detach().float(), ord=p, dim=1)


def column_importance(w: torch.Tensor, p: int = 2) -> torch.Tensor:
    """L1 (``p=1``) or L2 norm of each input column: (K,)."""
    if p not in (1, 2):
        raise ConfigError("norm", f"must be 1 or 2, got {p!r}")
    return torch.linalg.vector_norm(w.detach().float(), ord=p, dim=0)


def keep_indices(importance: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Sorted indices of the ``n_keep`` most important entries (earliest wins a tie)."""
    order = torch.argsort(-importance.float(), stable=True)[:n_keep]
    return torch.sort(order).values


def sparsity_of(t: torch.Tensor) -> float:
    return float((t == 0).sum()) / max(t.numel(), 1)
