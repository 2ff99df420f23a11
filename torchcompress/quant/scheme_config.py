"""Configs of the weight-and-activation schemes serving engines run (llm-compressor's presets).

=====================  ==============================================================  ===============
config                 what                                                            recipe kind
=====================  ==============================================================  ===============
FP8Config()            e4m3 weights per channel, activations dynamic per token          ``fp8``
FP8Config("block")     e4m3 weights per 128x128 block, weight-only (or activations per
                       token and 128-group with ``activations: dynamic``)               ``fp8``
W8A8Int8Config()       int8 weights per channel, int8 activations dynamic per token     ``w8a8_int8``
SmoothQuantConfig(a)   migrate activation outliers into the weights (float unchanged)   ``smoothquant``
FP4Config("nvfp4")     e2m1, blocks of 16, e4m3 block scales + fp32 global scale         ``fp4``
FP4Config("mxfp4")     e2m1, blocks of 32, e8m0 (power of two) scales                   ``fp4``
=====================  ==============================================================  ===============

Example::

    import torchcompress as tc
    from torchcompress.quant.scheme_config import FP8Config
    tc.quantize_(model, FP8Config())
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(name, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, got {value!r}")


@dataclass(frozen=True)
class FP8Config:
    """FP8 e4m3 weights; ``granularity``: ``channel`` (scale per output row) or ``block``
    (``block_size`` x ``block_size``); ``activations``: ``dynamic`` (per token at forward time; per
    token and ``block_size`` inputs for block weights) or ``none`` (weight-only)."""

    granularity: str = "channel"
    activations: str = "dynamic"
    block_size: int = 128

    def __post_init__(self):
        _choice("granularity", self.granularity, ("channel", "block"))
        _choice("activations", self.activations, ("dynamic", "none"))
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError("block_size", f"must be a positive integer, got {self.block_size!r}")


@dataclass(frozen=True)
class W8A8Int8Config:
    """INT8 W8A8: symmetric int8 weights per output channel, int8 activations dynamic per token.
    Usually after a ``smoothquant`` stage."""

    symmetric: bool = True  # the only layout vLLM's int8 W8A8 kernels take; kept for the recipe's clarity

    def __post_init__(self):
        _flag("symmetric", self.symmetric)
        if not self.symmetric:
            raise ConfigError("symmetric", "only symmetric int8 W8A8 is supported")


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant (Xiao et al. 2023): per input channel j of the linears after each norm (and of
    o_proj after v_proj, down_proj after up_proj), ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``;
    X is divided by s (folded into the norm / previous linear), W multiplied. The float function
    is unchanged; activation outliers move into the weights, which int8 per channel handles."""

    alpha: float = 0.5
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ConfigError("alpha", f"must be a number in [0, 1] (migration strength), got {a!r}")


@dataclass(frozen=True)
class FP4Config:
    """FP4 e2m1 weights (and activations): ``format`` ``nvfp4`` (blocks of 16, e4m3 scales, fp32
    global scale; the activations' global scale is calibrated) or ``mxfp4`` (blocks of 32, e8m0
    scales; all dynamic). ``activations: false`` gives the weight-only variant (NVFP4A16 / MXFP4A16)."""

    format: str = "nvfp4"
    activations: bool = True

    def __post_init__(self):
        _choice("format", self.format, ("nvfp4", "mxfp4"))
        _flag("activations", self.activations)

    @property
    def needs_calibration(self) -> bool:  # NVFP4 activations: a static global scale per layer
        return self.format == "nvfp4" and self.activations

    @property
    def block(self) -> int:
        return 16 if self.format == "nvfp4" else 32


SCHEME_STAGE_KINDS = {"fp8": FP8Config, "w8a8_int8": W8A8Int8Config, "smoothquant": SmoothQuantConfig,
                      "fp4": FP4Config}
