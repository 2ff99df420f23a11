"""``quantize_(model, GGUFQATConfig(t))``: nn.Linear -> GGUFQATLinear with the block type quantize_gguf_
would give that layer for ``GGUFConfig(<t>, pure=True)`` (same shape fallback), or the Linear
unchanged when its rows fit no block (quantize_gguf_ leaves those in float too).

    >>> tc.quantize_(model, GGUFQATConfig("Q4_K"))     # train ...
    >>> tc.freeze_(model)                              # GGUFQATLinear -> GGUFLinear
"""

from __future__ import annotations

from torch import nn

from ..formats.gguf_mix import fallback_type  # llama.cpp's shape fallback, the one TypePlanner applies
from ..nn.gguf_qat import GGUFQATLinear
from ..primitives.gguf_common import GGMLType
from .config import GGUFQATConfig


def block_type_for(qtype: GGMLType, in_features: int) -> GGMLType:
    """The block type a layer with rows of ``in_features`` gets (F16: none fits, stays float)."""
    return fallback_type(GGMLType(qtype), in_features)


def gguf_qat_module(linear: nn.Linear, cfg: GGUFQATConfig, name: str) -> nn.Module:
    t = block_type_for(cfg.ggml_type, linear.in_features)
    if t in (GGMLType.F16, GGMLType.F32, GGMLType.BF16):
        return linear
    return GGUFQATLinear.from_linear(linear, t, name=f"{name}.weight")
