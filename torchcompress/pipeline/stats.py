"""Statistics of a linear layer's inputs over the real calibration tokens, summed across processes.

Each collector keeps a float64 running sum on the device the activations live on (CUDA or CPU) of
float32 per-batch terms, and a token count; :meth:`Statistic.all_reduce` sums both over the ranks of
``torch.distributed`` (NCCL needs device tensors, gloo takes CPU ones: the sum stays on its device).

* ``hessian``: ``sum_t x_t x_t^T`` (K, K): GPTQ, SparseGPT, activation-aware SVD.
* ``diag``: ``sum_t x_t^2`` (K,): Wanda's ``||X_j||^2``, llama.cpp's imatrix.
* ``absmax``: ``max_t |x_t|`` (K,): SmoothQuant.
* ``absmean``: ``sum_t |x_t|`` (K,) (divide by ``tokens``): AWQ's activation statistic.
"""

from __future__ import annotations

import torch

KINDS = ("hessian", "diag", "absmax", "absmean")


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


class Statistic:
    def __init__(self, kind: str, k: int, device):
        if kind not in KINDS:
            raise ValueError(f"statistic kind {kind!r}; one of {KINDS}")
        self.kind = kind
        shape = (k, k) if kind == "hessian" else (k,)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.tokens = 0
        self.reduced = False

    def add(self, x: torch.Tensor) -> None:
        """``x``: (T, K) real-token inputs of one batch."""
        xf = x.float()
        if self.kind == "hessian":
            self.sum += (xf.T @ xf).to(self.sum.device, torch.float64)  # float32 product, float64 running sum
        elif self.kind == "diag":
            self.sum += xf.square().sum(0).to(self.sum.device, torch.float64)
        elif self.kind == "absmean":
            self.sum += xf.abs().sum(0).to(self.sum.device, torch.float64)
        else:
            torch.maximum(self.sum, xf.abs().amax(0).to(self.sum.device, torch.float64), out=self.sum)
        self.tokens += x.shape[0]

    def all_reduce(self) -> "Statistic":
        """Sum (max for ``absmax``) over the ranks, once."""
        d = _dist()
        if d is not None and not self.reduced:
            d.all_reduce(self.sum, op=d.ReduceOp.MAX if self.kind == "absmax" else d.ReduceOp.SUM)
            t = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.sum.device)
            d.all_reduce(t)
            self.tokens = int(t.item())
        self.reduced = True
        return self

    def hessian(self) -> torch.Tensor:
        """``H = 2 X^T X / T`` (float64), GPTQ's and SparseGPT's normalisation. Scales the sum in
        place (a (K, K) float64 copy is 1.6 GB for an 8B model's down_proj): call it once, last."""
        if not getattr(self, "_scaled", False):
            self.sum.mul_(2.0 / max(float(self.tokens), 1.0))
            self._scaled = True
        return self.sum

    def mean(self) -> torch.Tensor:
        """``sum / tokens`` (float32): the mean over the real tokens (``absmean``: mean |x| per channel)."""
        return (self.sum / max(float(self.tokens), 1.0)).float()
