"""A Linear whose weight is multiplied by a keep-mask in forward.

The mask is a bool buffer (saved with the weights), so pruned weights stay zero through training
(their gradient is zero) and through save/load. ``make_permanent()`` folds the mask into the weight
and returns a plain ``nn.Linear``.

Example::

    layer = PrunedLinear.from_linear(linear, keep_mask)
    layer.sparsity()  # fraction of weights pruned
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NumericError


class PrunedLinear(nn.Linear):
    """``y = x (W * mask)^T + b``. ``mask`` is True where a weight is kept."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        self.nm: tuple[int, int] | None = None  # the N:M pattern the mask follows, if any

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor, weight: torch.Tensor | None = None,
                    nm: tuple[int, int] | None = None, name: str = "weight") -> PrunedLinear:
        """Wrap ``linear`` (sharing nothing with it) with ``mask``; ``weight`` replaces its weight
        (SparseGPT's updated weights)."""
        w = linear.weight.detach() if weight is None else weight.detach()
        if mask.shape != linear.weight.shape or mask.dtype != torch.bool:
            raise NumericError(name, f"mask must be bool {tuple(linear.weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        if w.shape != linear.weight.shape:
            raise NumericError(name, f"new weight has shape {tuple(w.shape)}, expected {tuple(linear.weight.shape)}")
        dev, dt = linear.weight.device, linear.weight.dtype
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight = nn.Parameter((w.to(device=dev, dtype=torch.float32) * mask.to(dev)).to(dt),
                                  requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        new.mask = mask.to(dev).clone()
        new.nm = nm
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask.to(self.weight.dtype), self.bias)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (gradual pruning); the newly pruned weights are zeroed."""
        if mask.shape != self.mask.shape:
            raise NumericError("mask", f"expected shape {tuple(self.mask.shape)}, got {tuple(mask.shape)}")
        self.mask = mask.to(device=self.mask.device, dtype=torch.bool).clone()
        self.weight.mul_(self.mask.to(self.weight.dtype))

    def sparsity(self) -> float:
        """Fraction of weights pruned by the mask."""
        return 1.0 - float(self.mask.sum()) / self.mask.numel()

    def pruned_count(self) -> int:
        return int(self.mask.numel() - self.mask.sum())

    @torch.no_grad()
    def make_permanent(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the mask folded into its (zeroed) weight."""
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        out.weight = nn.Parameter(self.weight * self.mask.to(self.weight.dtype), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            out.bias = self.bias
        return out

    def extra_repr(self) -> str:
        nm = f", {self.nm[0]}:{self.nm[1]}" if self.nm else ""
        return f"{super().extra_repr()}, sparsity={self.sparsity():.3f}{nm}"


def pruned_linear_manifest(m: PrunedLinear) -> dict:
    d = {"type": "PrunedLinear", "in_features": m.in_features, "out_features": m.out_features,
         "bias": m.bias is not None, "dtype": str(m.weight.dtype).removeprefix("torch.")}
    if m.nm:
        d["nm"] = list(m.nm)
    return d


def pruned_linear_from_manifest(entry: dict, device="meta") -> PrunedLinear:
    dtype = getattr(torch, str(entry.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {entry.get('dtype')!r}")
    m = PrunedLinear(int(entry["in_features"]), int(entry["out_features"]), bool(entry["bias"]), device=device, dtype=dtype)
    nm = entry.get("nm")
    m.nm = (int(nm[0]), int(nm[1])) if nm else None
    return m
