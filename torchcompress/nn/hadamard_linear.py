"""``HadamardInputLinear``: a Linear whose input is rotated by a Hadamard at run time.

``y = base_layer(x @ H / sqrt(n))``; with the base weight stored as ``W H / sqrt(n)`` the product
is the original ``x W^T`` (``H H^T = n I``), while the base weight's columns are the rotated ones
(outliers spread: what QuaRot does to down_proj's input, where no earlier linear can absorb ``H``).
The base layer is any Linear-like module (``nn.Linear``, then a QuantLinear / GPTQLinear after
quantization: it has its own checkpoint entry ``<name>.base_layer``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.hadamard import hadamard_transform


class HadamardInputLinear(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.base_layer(hadamard_transform(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, online Hadamard"


def hadamard_linear_manifest(m: HadamardInputLinear) -> dict:
    """Checkpoint entry (no tensors of its own: H follows from the width); the base has its own entry
    when it is compressed, else its weight loads as a plain Linear's."""
    return {"type": "HadamardInputLinear", "in_features": m.in_features, "out_features": m.out_features,
            "bias": getattr(m.base_layer, "bias", None) is not None}


def hadamard_linear_from_manifest(entry: dict, device="meta") -> HadamardInputLinear:
    with torch.device(device):
        base = nn.Linear(int(entry["in_features"]), int(entry["out_features"]), bias=bool(entry["bias"]))
    return HadamardInputLinear(base)
