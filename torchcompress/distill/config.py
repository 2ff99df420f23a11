"""Typed settings for distillation losses and training stages."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


def _num(name: str, v, lo: float, hi: float | None = None, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(name, f"must be a number, got {v!r}")
    bad = v <= lo if lo_open else v < lo
    if bad or (hi is not None and v > hi):
        rng = f"({lo}, {hi if hi is not None else 'inf'}]" if lo_open else f"[{lo}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(name, f"must be in {rng}, got {v!r}")
    return float(v)


def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(name, f"must be a positive integer, got {v!r}")
    return v


@dataclass(frozen=True)
class KDConfig:
    """Knowledge-distillation loss: ``soft_weight * T^2 KL + hard_weight * CE + hidden_weight * MSE(hidden)``.

    ``layer_map``: (student hidden-state index, teacher hidden-state index) pairs for the hidden loss
    (indices into ``output_hidden_states``: 0 is the embedding output).
    """

    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    hidden_weight: float = 0.0
    layer_map: tuple = ()
    ignore_index: int = -100

    def __post_init__(self):
        _num("temperature", self.temperature, 0.0, 100.0, lo_open=True)
        for name in ("soft_weight", "hard_weight", "hidden_weight"):
            _num(name, getattr(self, name), 0.0)
        if self.soft_weight + self.hard_weight + self.hidden_weight <= 0:
            raise ConfigError("soft_weight", "soft_weight, hard_weight and hidden_weight are all 0: nothing to train on")
        pairs = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in self.layer_map)
        for p in pairs:
            if not (isinstance(p, tuple) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in p)):
                raise ConfigError("layer_map", f"entries must be [student_index, teacher_index] integer pairs, got {p!r}")
        object.__setattr__(self, "layer_map", pairs)
        if self.hidden_weight and not pairs:
            raise ConfigError("layer_map", "hidden_weight > 0 needs a non-empty layer_map")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ConfigError("ignore_index", f"must be an integer, got {self.ignore_index!r}")


@dataclass(frozen=True)
class TrainSettings:
    """How long and how fast a training stage runs (AdamW, constant learning rate after warmup)."""

    steps: int = 100
    lr: float = 1e-5
    batch_size: int = 4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        _pos_int("steps", self.steps)
        _pos_int("batch_size", self.batch_size)
        _num("lr", self.lr, 0.0, 1.0, lo_open=True)
        _num("weight_decay", self.weight_decay, 0.0, 10.0)
        _num("max_grad_norm", self.max_grad_norm, 0.0)
        for name in ("warmup_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(name, f"must be a non-negative integer, got {v!r}")
