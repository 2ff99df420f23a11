"""Frozen, validated pruning configs (one per technique); recipes name them in ``STAGE_KINDS``.

Unstructured configs take ``sparsity`` (fraction of weights zeroed per layer); set ``n`` and ``m``
(e.g. 2 and 4) for N:M sparsity along the input dimension instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..primitives.sparsity import check_nm, check_sparsity


def _check_pattern(cfg) -> None:
    check_sparsity(cfg.sparsity)
    for f in ("n", "m"):
        v = getattr(cfg, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f, f"must be a non-negative integer, got {v!r}")
    if cfg.n or cfg.m:
        check_nm(cfg.n, cfg.m, "n")


def _check_float(name: str, v, lo: float, hi: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ConfigError(name, f"must be a number in [{lo}, {hi}], got {v!r}")


@dataclass(frozen=True)
class MagnitudePruneConfig:
    """Zero the smallest ``|w|``: per layer (``scope='layer'``) or one ranking across all chosen
    layers (``scope='global'``); N:M is always per layer."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    scope: str = "layer"

    def __post_init__(self):
        _check_pattern(self)
        if self.scope not in ("layer", "global"):
            raise ConfigError("scope", f"must be 'layer' or 'global', got {self.scope!r}")
        if self.scope == "global" and self.n:
            raise ConfigError("scope", "N:M sparsity is per layer; use scope: layer")

    @property
    def nm(self):
        return (self.n, self.m) if self.n else None


@dataclass(frozen=True)
class WandaConfig:
    """Wanda: score ``|W| * ||X||_2`` per input feature, compared within each output row (or N:M group).
    Layer by layer on calibration data; each block's outputs come from its pruned weights."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        _check_pattern(self)

    @property
    def nm(self):
        return (self.n, self.m) if self.n else None


@dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT: Hessian-based mask selection with OBS weight updates, layer by layer."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    block_size: int = 128
    damp: float = 0.01
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        _check_pattern(self)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError("block_size", f"must be a positive integer, got {self.block_size!r}")
        if self.n and self.block_size % self.m:
            raise ConfigError("block_size", f"must be a multiple of m={self.m}, got {self.block_size}")
        _check_float("damp", self.damp, 0.0, 10.0)

    @property
    def nm(self):
        return (self.n, self.m) if self.n else None


_IMPORTANCE = ("l1", "l2", "activation")


@dataclass(frozen=True)
class StructuredPruneConfig:
    """Remove whole MLP intermediate channels and attention heads of a transformers decoder.

    ``mlp_ratio``: fraction of each layer's intermediate channels removed (gate/up rows and the
    matching down_proj columns). ``head_ratio``: fraction of key/value heads removed, each with
    its group of query heads (q/k/v rows, o_proj columns). ``importance``: L1/L2 norm of the
    weights, or ``activation`` (``||X_j|| * ||W_down[:, j]||``, from forward hooks on calibration data).
    ``allocation='uniform'`` removes the same count from every layer and physically shrinks the model
    (config updated: it saves and reloads as a smaller model). ``'adaptive'`` ranks channels across
    layers under the global budget (``mlp_ratio`` of all channels, at most ``max_layer_ratio`` of one
    layer); transformers configs hold one intermediate size, so adaptive results stay masked.
    """

    mlp_ratio: float = 0.25
    head_ratio: float = 0.0
    importance: str = "l2"
    allocation: str = "uniform"
    max_layer_ratio: float = 0.9
    physical: bool = True  # False: zero the same rows/columns with masks instead (same outputs)

    def __post_init__(self):
        _check_float("mlp_ratio", self.mlp_ratio, 0.0, 0.99)
        _check_float("head_ratio", self.head_ratio, 0.0, 0.99)
        _check_float("max_layer_ratio", self.max_layer_ratio, 0.0, 0.99)
        if self.importance not in _IMPORTANCE:
            raise ConfigError("importance", f"must be one of {', '.join(_IMPORTANCE)}, got {self.importance!r}")
        if self.allocation not in ("uniform", "adaptive"):
            raise ConfigError("allocation", f"must be 'uniform' or 'adaptive', got {self.allocation!r}")
        if self.allocation == "adaptive" and self.importance != "activation":
            raise ConfigError("allocation", "adaptive rates compare channels across layers: needs importance: activation")
        if self.allocation == "adaptive" and self.head_ratio:
            raise ConfigError("head_ratio", "adaptive allocation covers MLP channels only; set head_ratio: 0")
        if not isinstance(self.physical, bool):
            raise ConfigError("physical", f"must be true or false, got {self.physical!r}")
        if self.max_layer_ratio < self.mlp_ratio:
            raise ConfigError("max_layer_ratio", f"must be >= mlp_ratio ({self.mlp_ratio}), got {self.max_layer_ratio}")

    @property
    def needs_calibration(self) -> bool:
        return self.importance == "activation"
