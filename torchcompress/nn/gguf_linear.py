"""GGUFLinear: an ``nn.Linear`` whose weight is kept as ggml blocks (Q4_K, Q8_0, ...) and computed from.

    >>> lin = GGUFLinear.from_linear(nn.Linear(512, 256), GGMLType.Q4_K)
    >>> y = lin(torch.randn(3, 512))          # one op: torchcompress::gguf_linear
    >>> lin.blocks.shape                      # (256, 2 * 144): the exact bytes a .gguf holds
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.backend import run_op
from ..ops.gguf_linear import dequantize_rows, gguf_linear_impl  # (importing it registers torchcompress::gguf_linear)
from ..primitives.gguf_blocks import quantize
from ..primitives.gguf_common import GGMLType, row_bytes


class GGUFLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, qtype: GGMLType, bias: bool = False, *, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.qtype = GGMLType(qtype)
        self.register_buffer("blocks", torch.zeros(out_features, row_bytes(self.qtype, in_features), dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: GGMLType, name: str = "weight",
                    importance: torch.Tensor | None = None) -> "GGUFLinear":
        """``importance``: optional (in_features,) imatrix column weights (see ``gguf_blocks.quantize``)."""
        mod = cls(linear.in_features, linear.out_features, qtype, linear.bias is not None, device="meta")
        mod.blocks = quantize(linear.weight.detach(), qtype, name=name, importance=importance)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().clone())
        return mod

    is_packed = True  # always holds blocks (reports and savers check this, as for QuantLinear)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.blocks, int(self.qtype), self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        return run_op(torch.ops.torchcompress.gguf_linear, gguf_linear_impl,
                      x, self.blocks, self.bias, int(self.qtype), self.in_features)

    def weight_bits(self) -> int:
        return self.blocks.numel() * 8

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}, bias={self.bias is not None}"


class GGUFEmbedding(nn.Module):
    """``nn.Embedding`` over ggml blocks: each lookup dequantizes only the rows it gathers."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: GGMLType, *, device=None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.qtype = GGMLType(qtype)
        self.register_buffer("blocks", torch.zeros(num_embeddings, row_bytes(self.qtype, embedding_dim), dtype=torch.uint8, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., D)
        rows = self.blocks.index_select(0, ids.reshape(-1))
        return dequantize_rows(rows, int(self.qtype), self.embedding_dim, torch.float32).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"


def gguf_linear_manifest(m: GGUFLinear) -> dict:
    return {"type": "GGUFLinear", "in_features": m.in_features, "out_features": m.out_features,
            "qtype": m.qtype.name, "bias": m.bias is not None}


def gguf_linear_from_manifest(entry: dict, device="meta") -> GGUFLinear:
    from ..errors import ConfigError

    try:
        qt = GGMLType[str(entry["qtype"])]
    except KeyError:
        raise ConfigError("qtype", f"unknown GGUF block type {entry.get('qtype')!r}") from None
    for field in ("in_features", "out_features"):  # a hostile manifest: sizes before any allocation
        if int(entry[field]) < 1:
            raise ConfigError(field, f"must be a positive integer, got {entry[field]!r}")
    return GGUFLinear(int(entry["in_features"]), int(entry["out_features"]), qt, bool(entry["bias"]), device=device)
