"""Typed, frozen configs for low-rank techniques: LoRA adapters and SVD factorization.

Example::

    from torchcompress.lowrank import LoRAConfig, SVDConfig
    LoRAConfig(targets=("q_proj", "v_proj"), r=8, alpha=16)
    SVDConfig(param_ratio=0.5, activation_aware=True)   # keep half the parameters of each layer
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import check_int, targets_tuple
from ..errors import ConfigError

LORA_INITS = ("default", "gaussian")
SVD_ALLOCATIONS = ("uniform", "global")


def _check_number(name: str, value, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"must be a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(name, f"must be in {lb}{lo:g}, {hi:g}{rb}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (Hu et al. 2021) on the matching layers; same meaning as PEFT's ``LoraConfig``.

    ``targets``: module names, ``re:`` regexes or types (PEFT's ``target_modules``); ``alpha`` is
    PEFT's ``lora_alpha``; ``scaling = alpha / r`` or ``alpha / sqrt(r)`` with ``use_rslora``;
    ``init``: ``"default"`` (kaiming-uniform A, zero B) or ``"gaussian"`` (A ~ N(0, 1/r^2), zero B).
    """

    targets: tuple = ("q_proj", "v_proj")
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"

    def __post_init__(self):
        object.__setattr__(self, "targets", targets_tuple("targets", self.targets))
        if not self.targets:
            raise ConfigError("targets", "must name at least one module")
        if check_int("r", self.r) < 1:
            raise ConfigError("r", f"must be a positive integer, got {self.r}")
        _check_number("alpha", self.alpha, 0.0, 1e6, lo_open=True)
        _check_number("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if not isinstance(self.use_rslora, bool):
            raise ConfigError("use_rslora", f"must be true or false, got {self.use_rslora!r}")
        if self.init not in LORA_INITS:
            raise ConfigError("init", f"must be one of {', '.join(LORA_INITS)}, got {self.init!r}")


@dataclass(frozen=True)
class SVDConfig:
    """Replace Linear layers by two thin Linears from a truncated SVD (``W ~ up @ down``).

    Exactly one of: ``rank`` (the same rank everywhere), ``energy`` (smallest rank keeping this
    fraction of the squared singular values), ``param_ratio`` (fraction of each layer's weight
    parameters kept, ``r * (N + K) <= ratio * N * K``; with ``allocation: global`` the ratio is a
    budget over all targeted layers and ranks go where they remove the most relative error).

    ``activation_aware``: whiten by the calibration activations' second moment ``X^T X = S S^T``
    (Cholesky) and truncate ``W S`` (SVD-LLM): minimises the output error ``||X (W - W')^T||``
    instead of the weight error; needs calibration data. ``damp``: fraction of the mean diagonal
    of ``X^T X`` added before the Cholesky. Layers whose factorization would not save parameters
    stay dense.
    """

    rank: int | None = None
    energy: float | None = None
    param_ratio: float | None = None
    allocation: str = "uniform"
    activation_aware: bool = False
    damp: float = 0.01

    def __post_init__(self):
        given = [n for n in ("rank", "energy", "param_ratio") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError("rank", f"give exactly one of rank, energy, param_ratio (got {', '.join(given) or 'none'})")
        if self.rank is not None and check_int("rank", self.rank) < 1:
            raise ConfigError("rank", f"must be a positive integer, got {self.rank}")
        if self.energy is not None:
            _check_number("energy", self.energy, 0.0, 1.0, lo_open=True)
        if self.param_ratio is not None:
            _check_number("param_ratio", self.param_ratio, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.allocation not in SVD_ALLOCATIONS:
            raise ConfigError("allocation", f"must be one of {', '.join(SVD_ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "global" and self.param_ratio is None:
            raise ConfigError("allocation", "'global' allocates a parameter budget: it needs param_ratio")
        if not isinstance(self.activation_aware, bool):
            raise ConfigError("activation_aware", f"must be true or false, got {self.activation_aware!r}")
        _check_number("damp", self.damp, 0.0, 10.0)

    @property
    def needs_calibration(self) -> bool:  # the CLI builds calibration data for such stages
        return self.activation_aware
