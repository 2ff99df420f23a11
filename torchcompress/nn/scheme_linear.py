"""Linears for the weight-and-activation schemes: FP8Linear, Int8Linear (W8A8), FP4Linear (NVFP4 / MXFP4).

Plain tensor buffers named as compressed-tensors names them, so the export is a rename-free copy:

* FP8Linear: ``weight`` (N, K) float8_e4m3fn, ``weight_scale`` fp32 (N, 1) or (ceil(N/128), ceil(K/128));
* Int8Linear: ``weight`` (N, K) int8, ``weight_scale`` fp32 (N, 1);
* FP4Linear: ``weight_packed`` (N, K/2) uint8, ``weight_scale`` (N, K/16) float8_e4m3fn + ``weight_global_scale``
  fp32 (1,) [+ ``input_global_scale`` (1,) with activations] for NVFP4, or (N, K/32) uint8 e8m0 for MXFP4.

Each forward is one function of :mod:`torchcompress.ops.scheme_linear` (reference on CPU).

Example::

    m = FP8Linear.from_linear(nn.Linear(576, 1536), FP8Config())
    y = m(torch.randn(2, 576))
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError, NumericError
from ..ops import scheme_linear as ops
from ..primitives.fp4 import (dequantize_mxfp4, dequantize_nvfp4, nvfp4_global_scale, quantize_mxfp4,
                              quantize_nvfp4)
from ..primitives.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8_block, quantize_fp8_channel
from ..primitives.int8 import quantize_int8_channel
from ..quant.scheme_config import FP4Config, FP8Config, W8A8Int8Config


class SchemeLinear(nn.Module):
    """Shared shape bookkeeping; subclasses set their buffers and forward."""

    is_packed = True  # no float master weight (reports and exporters check this)

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        for field, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(field, f"must be a positive integer, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def _take_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def weight_bits(self) -> int:
        """Bits of the stored weight (codes and scales); the bias is not counted."""
        return sum(t.numel() * t.element_size() * 8 for k, t in self.named_buffers() if not k.startswith("input_"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _check_weight(linear: nn.Linear, name: str) -> torch.Tensor:
    w = linear.weight.detach()
    if w.numel() == 0:
        raise NumericError(name, f"is empty (shape {tuple(w.shape)})")
    return w


class FP8Linear(SchemeLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: FP8Config = FP8Config(),
                 device=None):
        super().__init__(in_features, out_features, bias, device)
        self.config = config
        self.block = (config.block_size, config.block_size) if config.granularity == "block" else None
        shape = ((out_features, 1) if self.block is None
                 else (-(-out_features // self.block[0]), -(-in_features // self.block[1])))
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(shape, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FP8Config, name: str = "weight") -> "FP8Linear":
        w = _check_weight(linear, name)
        mod = cls(linear.in_features, linear.out_features, False, config, device="meta")
        q, s = quantize_fp8_channel(w, name) if mod.block is None else quantize_fp8_block(w, mod.block, name)
        mod.weight, mod.weight_scale = q, s
        mod._take_bias(linear)
        return mod

    @property
    def act_dynamic(self) -> bool:
        return self.config.activations == "dynamic"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.bias, self.block, self.act_dynamic)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 e4m3 {self.config.granularity}, activations={self.config.activations}"


class Int8Linear(SchemeLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: W8A8Int8Config = W8A8Int8Config(),
                 device=None):
        super().__init__(in_features, out_features, bias, device)
        self.config = config
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: W8A8Int8Config = W8A8Int8Config(), name: str = "weight") -> "Int8Linear":
        w = _check_weight(linear, name)
        mod = cls(linear.in_features, linear.out_features, False, config, device="meta")
        mod.weight, mod.weight_scale = quantize_int8_channel(w, name)
        mod._take_bias(linear)
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 W8A8 (weights per channel, activations per token)"


class FP4Linear(SchemeLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: FP4Config = FP4Config(),
                 device=None):
        super().__init__(in_features, out_features, bias, device)
        self.config = config
        nv = config.format == "nvfp4"
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, in_features // config.block, device=device,
                                                         dtype=FP8_DTYPE if nv else torch.uint8))
        if nv:
            self.register_buffer("weight_global_scale", torch.ones(1, device=device))
            if config.activations:
                self.register_buffer("input_global_scale", torch.ones(1, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FP4Config, name: str = "weight",
                    input_absmax: torch.Tensor | float | None = None) -> "FP4Linear":
        """``input_absmax``: max |x| over calibration data (NVFP4 with activations needs it)."""
        w = _check_weight(linear, name)
        mod = cls(linear.in_features, linear.out_features, False, config, device="meta")
        if config.format == "nvfp4":
            mod.weight_packed, mod.weight_scale, mod.weight_global_scale = quantize_nvfp4(w, name)
            if config.activations:
                if input_absmax is None:
                    raise ConfigError("calib_data", f"{name}: NVFP4 activations need a calibrated input range "
                                      "(pass calibration data)")
                amax = torch.as_tensor(input_absmax, dtype=torch.float32)
                if not bool(torch.isfinite(amax).all()):
                    raise NumericError(f"{name}:input", "calibration activations hold NaN/Inf")
                mod.input_global_scale = nvfp4_global_scale(amax)
        else:
            mod.weight_packed, mod.weight_scale = quantize_mxfp4(w, name)
        mod._take_bias(linear)
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.config.format == "nvfp4":
            return dequantize_nvfp4(self.weight_packed, self.weight_scale, self.weight_global_scale, dtype)
        return dequantize_mxfp4(self.weight_packed, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.format == "nvfp4":
            return ops.nvfp4_linear(x, self.weight_packed, self.weight_scale, self.weight_global_scale,
                                    getattr(self, "input_global_scale", None), self.bias)
        return ops.mxfp4_linear(x, self.weight_packed, self.weight_scale, self.config.activations, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.config.format}, activations={self.config.activations}"


# -- our own manifest (formats/checkpoint.py MODULE_KINDS): describe / rebuild an empty twin ---------

_KINDS = {"FP8Linear": (FP8Linear, FP8Config), "Int8Linear": (Int8Linear, W8A8Int8Config), "FP4Linear": (FP4Linear, FP4Config)}


def scheme_linear_manifest(m: SchemeLinear) -> dict:
    import dataclasses

    return {"type": type(m).__name__, "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "config": dataclasses.asdict(m.config)}


def scheme_linear_from_manifest(entry: dict, device="meta") -> SchemeLinear:
    cls, cfg_cls = _KINDS[entry["type"]]
    cfg = entry["config"]
    if not isinstance(cfg, dict):
        raise ValueError(f"config must be a mapping, got {type(cfg).__name__}")
    return cls(int(entry["in_features"]), int(entry["out_features"]), bool(entry["bias"]), cfg_cls(**cfg), device=device)


def register_manifest_kinds(kinds: dict) -> None:
    """Add the three module types to a ``MODULE_KINDS`` table (formats/checkpoint.py)."""
    for name, (cls, _) in _KINDS.items():
        kinds[name] = (cls, scheme_linear_manifest, scheme_linear_from_manifest)
