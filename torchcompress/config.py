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
    """

    bits: int = 4
    granularity: Granularity = Granularity.GROUP
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "float16"

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
    full min/max.
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    mse: bool = False
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


STAGE_KINDS["gptq"] = GPTQConfig

from .quant.gguf_config import GGUFConfig  # noqa: E402  (GGUF block quantization, issue #3)

STAGE_KINDS["gguf"] = GGUFConfig

from .prune.config import MagnitudePruneConfig, SparseGPTConfig, StructuredPruneConfig, WandaConfig  # noqa: E402  (issue #6)

STAGE_KINDS.update(prune_magnitude=MagnitudePruneConfig, wanda=WandaConfig, sparsegpt=SparseGPTConfig,
                   prune_structured=StructuredPruneConfig)

from .lowrank.config import LoRAConfig, SVDConfig  # noqa: E402  (low-rank, issue #8)

STAGE_KINDS.update(lora=LoRAConfig, svd=SVDConfig)

from .training.config import DistillConfig, QATTrainConfig  # noqa: E402  (training-time compression, issue #7)

STAGE_KINDS.update(qat=QATTrainConfig, distill=DistillConfig)

from .quant.scheme_config import SCHEME_STAGE_KINDS  # noqa: E402  (FP8 / INT8 W8A8 / SmoothQuant / FP4, issue #21)

STAGE_KINDS.update(SCHEME_STAGE_KINDS)
