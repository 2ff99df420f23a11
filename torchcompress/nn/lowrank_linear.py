"""LowRankLinear: ``nn.Linear`` replaced by two thin Linears, ``up(down(x))``.

``down``: (r, K) without bias, ``up``: (N, r) carrying the original bias. Parameters fall from
``N * K`` to ``r * (N + K)``. Both children are plain ``nn.Linear``, so they can be quantized or
given LoRA adapters afterwards like any other Linear.

Example::

    m = LowRankLinear.from_factors(up, down, bias)     # up (N, r), down (r, K)
    y = m(torch.randn(2, down.shape[1]))
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        for field, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(field, f"must be a positive integer, got {v!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> "LowRankLinear":
        (n, r), (r2, k) = up.shape, down.shape
        if r != r2:
            raise ConfigError("rank", f"up {tuple(up.shape)} and down {tuple(down.shape)} disagree on the rank")
        mod = cls(k, n, r, bias is not None, device="meta")
        mod.down.weight = nn.Parameter(down.detach().to(dtype).contiguous())
        mod.up.weight = nn.Parameter(up.detach().to(dtype).contiguous())
        if bias is not None:
            mod.up.bias = nn.Parameter(bias.detach().to(dtype).clone())
        return mod

    @property
    def weight(self) -> torch.Tensor:
        """The dense (N, K) product (for inspection and error metrics; the forward never builds it)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self):
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., r) -> (..., N)
        return self.up(self.down(x))

    def num_params(self) -> int:
        return self.rank * (self.in_features + self.out_features) + (0 if self.up.bias is None else self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.up.bias is not None}"


def lowrank_linear_manifest(m: LowRankLinear) -> dict:
    return {"type": "LowRankLinear", "in_features": m.in_features, "out_features": m.out_features,
            "rank": m.rank, "bias": m.up.bias is not None}


def lowrank_linear_from_manifest(entry: dict, device="meta") -> LowRankLinear:
    return LowRankLinear(int(entry["in_features"]), int(entry["out_features"]), int(entry["rank"]),
                         bool(entry["bias"]), device=device)
