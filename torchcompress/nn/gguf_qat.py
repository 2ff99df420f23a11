"""QAT with a GGUF block type as the fake quantizer: GGUFQATLinear (float master weight) -> GGUFLinear.

Forward: ``dequantize(quantize(w, t))`` with our bit-exact ggml block functions
(:mod:`torchcompress.primitives.gguf_blocks`: the native kernel when built, else the PyTorch
reference; the two are byte-identical), so training sees exactly the weights llama.cpp would compute
with. Backward: the straight-through estimator, identity everywhere.

Clip behaviour (documented choice): the gradient passes through for every weight, clipped or not.
Every ggml block type derives its scales (and mins) from the block's own values, like our integer RTN
path, so a weight is "clipped" only because the block's scale search chose a range that rounds it to
the edge code (Q4_0's ``d = max / -8`` puts the opposite extreme at +7.x -> 7; the K-quant searches
trade a few clipped outliers for finer steps). That range moves with the weights, so zeroing those
gradients would freeze exactly the extreme weights that decide it; the plain STE lets them move.

    >>> lin = GGUFQATLinear.from_linear(nn.Linear(512, 256), GGMLType.Q4_K)
    >>> lin(torch.randn(3, 512)).sum().backward()          # lin.weight.grad is set
    >>> packed = lin.freeze()                              # a GGUFLinear, quantize(lin.weight) bytes
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NumericError
from ..primitives.gguf_blocks import dequantize, quantize
from ..primitives.gguf_common import GGMLType
from .gguf_linear import GGUFLinear


def gguf_fake_quantize(w: torch.Tensor, qtype: GGMLType, name: str = "weight") -> torch.Tensor:
    """(N, K) -> ``dequantize(quantize(w))`` in ``w``'s dtype (no gradient)."""
    qtype = GGMLType(qtype)
    data = quantize(w.detach(), qtype, name=name)
    return dequantize(data, qtype, tuple(w.shape)).to(w.dtype)


class _GGUFFakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, qtype: GGMLType, name: str) -> torch.Tensor:
        return gguf_fake_quantize(w, qtype, name)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def gguf_fake_quantize_ste(w: torch.Tensor, qtype: GGMLType, name: str = "weight") -> torch.Tensor:
    """Differentiable GGUF fake quantization of a 2-D weight (identity gradient)."""
    return _GGUFFakeQuantSTE.apply(w, GGMLType(qtype), name)


class GGUFQATLinear(nn.Module):
    """An ``nn.Linear`` in GGUF fake-quant mode: trains ``weight``, computes with its ``qtype`` blocks."""

    is_packed = False  # reports and hooks check this, as for QuantLinear

    def __init__(self, in_features: int, out_features: int, qtype: GGMLType, bias: bool = True, *,
                 device=None, dtype: torch.dtype | None = None, name: str = "weight"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qtype = GGMLType(qtype)
        self.name = name  # labels errors (NaN weights after a diverged step)
        fk = {"device": device, "dtype": dtype or torch.float32}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
        self.bias = nn.Parameter(torch.zeros(out_features, **fk)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: GGMLType, name: str = "weight") -> "GGUFQATLinear":
        w = linear.weight.detach()
        if not torch.isfinite(w).all():
            raise NumericError(name, "contains NaN or Inf; refusing to quantize")
        mod = cls(linear.in_features, linear.out_features, qtype, linear.bias is not None, device="meta", name=name)
        mod.weight = nn.Parameter(w.clone())
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        quantize(w[:1], mod.qtype, name=name)  # a row length the type cannot hold fails here, not mid-training
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight the forward computes with (and the frozen layer will)."""
        return gguf_fake_quantize(self.weight, self.qtype, self.name).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        w = gguf_fake_quantize_ste(self.weight, self.qtype, self.name)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def freeze(self, name: str | None = None) -> GGUFLinear:
        """A new :class:`GGUFLinear` holding ``quantize(weight, qtype)`` (the module itself is unchanged)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.weight.detach(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return GGUFLinear.from_linear(lin, self.qtype, name=name or self.name)

    def weight_bits(self) -> int:
        return self.weight.numel() * self.weight.element_size() * 8

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}, "
                f"bias={self.bias is not None}, fake-quant")


def freeze_gguf_qat_(model: nn.Module) -> nn.Module:
    """Replace every GGUFQATLinear of ``model`` by its frozen GGUFLinear, in place (a module shared
    under several names gets one replacement)."""
    from ..targets import set_submodule

    done: dict[int, GGUFLinear] = {}
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, GGUFQATLinear)]
    if any(name == "" for name, _ in found):
        raise TypeError("freeze_gguf_qat_: pass the model that contains the GGUFQATLinear, not the layer (use .freeze())")
    for name, m in found:
        new = done.get(id(m))
        if new is None:
            new = done[id(m)] = m.freeze(name=f"{name}.weight")
        set_submodule(model, name, new)
    return model
