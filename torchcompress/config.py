"""Typed, frozen configs and the one name -> class table that recipes use.

Example::

    from torchcompress import QuantScheme, RTNConfig
    scheme = QuantScheme(bits=4, granularity="group", group_size=128, symmetric=False)
    cfg = RTNConfig(scheme)
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .errors import ConfigError

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Granularity(str, enum.Enum):
    """How many weights share one scale (and zero point)."""

    TENSOR = "tensor"  # one scale for the whole weight
    CHANNEL = "channel"  # one scale per output row
    GROUP = "group"  # one scale per `group_size` consecutive inputs of a row


def _check_int(name: str, value: Any) -> int:
    # bool is an int subclass; True as a bit width is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class QuantScheme:
    """Integer weight quantization: bits, granularity, symmetry, scale dtype.

    * symmetric: signed codes in [-2^(b-1), 2^(b-1)-1], scale = max|w| / (2^(b-1)-1), no zero point.
    * asymmetric: unsigned codes in [0, 2^b-1] with an integer zero point; the range always
      contains 0 so that exact zeros stay exact.

    A group size that does not divide ``in_features`` gives a shorter last group.
    ``float_zero`` (asymmetric only): the zero point is a float stored in ``scale_dtype`` instead of
    an integer (HQQ's layout, ``w_hat = (code - zero) * scale``); the native CPU kernel and the
    GPTQ / compressed-tensors exports need integer zeros and refuse it (the PyTorch and Triton kernels run it).
    """

    bits: int = 4
    granularity: Granularity = Granularity.GROUP
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "float16"
    float_zero: bool = False

    def __post_init__(self):
        bits = _check_int("bits", self.bits)
        if not 2 <= bits <= 8:
            raise ConfigError("bits", f"must be between 2 and 8, got {bits}")
        try:
            gran = Granularity(self.granularity)
        except ValueError:
            allowed = ", ".join(g.value for g in Granularity)
            raise ConfigError("granularity", f"must be one of {allowed}, got {self.granularity!r}") from None
        object.__setattr__(self, "granularity", gran)
        gs = _check_int("group_size", self.group_size)
        if gran is Granularity.GROUP and gs <= 0:
            raise ConfigError("group_size", f"must be a positive integer, got {gs}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError("symmetric", f"must be true or false, got {self.symmetric!r}")
        if not isinstance(self.scale_dtype, str) or self.scale_dtype not in _SCALE_DTYPES:
            raise ConfigError("scale_dtype", f"must be one of {', '.join(_SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if not isinstance(self.float_zero, bool):
            raise ConfigError("float_zero", f"must be true or false, got {self.float_zero!r}")
        if self.float_zero and self.symmetric:
            raise ConfigError("float_zero", "needs symmetric: false (a symmetric scheme has no zero point)")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def group_size_for(self, in_features: int) -> int:
        """The effective group length along the input dimension for a layer."""
        if self.granularity is Granularity.GROUP:
            return self.group_size
        return in_features  # CHANNEL: the whole row; TENSOR handled by the caller

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["granularity"] = self.granularity.value
        if not self.float_zero:  # manifests of integer-zero schemes stay as they were
            del d["float_zero"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantScheme":
        return _from_dict(cls, d, "scheme")


def _from_dict(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ConfigError(where, f"must be a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(names))}")
    return cls(**d)


def _targets_tuple(name: str, value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        value = (value,)
    value = tuple(value)
    for v in value:
        if not (isinstance(v, str) and v) and not isinstance(v, type):
            raise ConfigError(name, f"entries must be module names, 're:' regexes or module types, got {v!r}")
    return value


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest post-training weight quantization of Linear layers."""

    scheme: QuantScheme = field(default_factory=QuantScheme)

    def __post_init__(self):
        if not isinstance(self.scheme, QuantScheme):
            raise ConfigError("scheme", f"must be a QuantScheme, got {type(self.scheme).__name__}")


@dataclass(frozen=True)
class QATConfig:
    """Prepare Linear layers for quantization-aware training (fake-quant + straight-through estimator).

    Call :func:`torchcompress.freeze_` after training to pack the weights.
    ``learnable_scale``: LSQ step sizes (trainable scales, RTN init, gradient scaled by
    1/sqrt(n * Q_P)); see ``nn/lsq.py``. Off: scales follow each group's range (plain STE).
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    learnable_scale: bool = False

    def __post_init__(self):
        if not isinstance(self.scheme, QuantScheme):
            raise ConfigError("scheme", f"must be a QuantScheme, got {type(self.scheme).__name__}")
        if not isinstance(self.learnable_scale, bool):
            raise ConfigError("learnable_scale", f"must be true or false, got {self.learnable_scale!r}")


# The one name -> config class table for recipes (`kind:` of a stage). Techniques add theirs here.
# the core stage kinds; the full name -> config table (every technique's) is recipe/registry.py
STAGE_KINDS: dict[str, type] = {"rtn": RTNConfig, "qat_prepare": QATConfig}


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (Hessian-aware) weight quantization, layer by layer on calibration data.

    ``damp``: fraction of the mean Hessian diagonal added to it; ``block_size``: columns per lazy
    update; ``act_order``: quantize columns by decreasing Hessian diagonal (groups follow, ``g_idx``);
    ``static_groups``: group scales from the float weight (sequential ``g_idx`` even with act-order);
    ``true_sequential``: quantize a block's linears in execution order, each seeing the quantized
    outputs of the ones before; ``mse``: each group's range is the shrink of its min/max that
    minimises ``sum |w_hat - w|^2.4`` (the GPTQ reference quantizer's ``mse`` option) instead of the
    full min/max. ``expert_min_tokens``: a mixture-of-experts expert whose projections saw fewer than
    this many calibration tokens per input feature (its Hessian is calibrated only on the tokens
    routed to it) is rounded to nearest instead, with the same range choice, and recorded as such.
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    mse: bool = False
    expert_min_tokens: float = 2.0
    needs_calibration: ClassVar[bool] = True  # the CLI builds calibration data for such stages

    def __post_init__(self):
        if not isinstance(self.scheme, QuantScheme):
            raise ConfigError("scheme", f"must be a QuantScheme, got {type(self.scheme).__name__}")
        if _check_int("block_size", self.block_size) < 1:
            raise ConfigError("block_size", f"must be a positive integer, got {self.block_size}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp <= 10:
            raise ConfigError("damp", f"must be a number in [0, 10] (fraction of the mean Hessian diagonal), got {self.damp!r}")
        for name in ("act_order", "static_groups", "true_sequential", "mse"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        t = self.expert_min_tokens
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
            raise ConfigError("expert_min_tokens", f"must be a number >= 0 (calibration tokens per input feature), got {t!r}")


STAGE_KINDS["gptq"] = GPTQConfig


@dataclass(frozen=True)
class HQQConfig:
    """HQQ (half-quadratic quantization, Badri & Shaji 2023): data-free optimisation of each group's
    zero point (and, with ``optimize_scale``, scale) for an lp-norm (p < 1) weight error; no calibration.

    ``lp_norm``, ``beta``, ``kappa``, ``iters``: the solver's p, initial penalty, its growth per
    iteration, and the iteration count (the paper's 0.7, 10, 1.01, 20). ``round_zero``: start float
    zero points from the rounded min/max zero (the hqq package's 4-bit default; on SmolLM2 W4 g64 it is
    what brings perplexity from 27.9 to 26.6). ``early_stop``: stop once the tensor's mean |error|
    stops falling (the hqq package's rule). ``scheme.float_zero``: float
    zero points as the hqq package stores them (best quality; reference and Triton kernels only),
    else integer zero points every kernel and export reads. See ``primitives/hqq.py``.
    """

    scheme: QuantScheme = field(default_factory=lambda: QuantScheme(bits=4, group_size=64, symmetric=False,
                                                                    float_zero=True))
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    optimize_scale: bool = False
    round_zero: bool = True
    early_stop: bool = True

    def __post_init__(self):
        if not isinstance(self.scheme, QuantScheme):
            raise ConfigError("scheme", f"must be a QuantScheme, got {type(self.scheme).__name__}")
        for name, lo, hi in (("lp_norm", 0.0, 1.0), ("beta", 0.0, 1e6), ("kappa", 1.0, 10.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v <= hi and not (name == "kappa" and v == lo):
                raise ConfigError(name, f"must be a number in ({lo}, {hi}], got {v!r}" if name != "kappa"
                                  else f"must be a number in [1, 10], got {v!r}")
        if not 0 <= _check_int("iters", self.iters) <= 10000:
            raise ConfigError("iters", f"must be an integer in [0, 10000], got {self.iters}")
        for name in ("optimize_scale", "round_zero", "early_stop"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.scheme.symmetric and not self.optimize_scale:
            raise ConfigError("optimize_scale", "must be true for a symmetric scheme (it has no zero point to optimise)")

    def solver_options(self) -> dict:
        return {"lp_norm": float(self.lp_norm), "beta": float(self.beta), "kappa": float(self.kappa),
                "iters": self.iters, "optimize_scale": self.optimize_scale, "round_zero": self.round_zero,
                "early_stop": self.early_stop}


STAGE_KINDS["hqq"] = HQQConfig


# public names for the validation helpers the techniques' configs share
check_int = _check_int
targets_tuple = _targets_tuple
