"""AutoRoundConfig: the ``autoround`` recipe stage's settings (kept import-light: the registry imports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import QuantScheme, check_int
from ..errors import ConfigError


@dataclass(frozen=True)
class AutoRoundConfig:
    """Sign-gradient rounding (AutoRound's SignRound) per decoder block: ``iters`` signed-gradient
    steps on the block's output error learn each weight's rounding offset and each group's clip factors.

    ``lr``: the first step's size (None: ``1 / iters``, AutoRound's default), decaying linearly to 0;
    ``batch_size``: calibration samples per step (drawn at random, seeded by ``seed`` and the block's
    index, from one captured batch of the pipeline); ``scheme``: bits, group size, symmetry and scale
    dtype of the packed result (integer zero points). ``iters: 0`` is round-to-nearest.
    """

    scheme: QuantScheme = field(default_factory=lambda: QuantScheme(bits=4, group_size=128, symmetric=False))
    iters: int = 200
    lr: float | None = None
    batch_size: int = 8
    seed: int = 0
    needs_calibration: ClassVar[bool] = True  # the CLI builds calibration data for such stages

    def __post_init__(self):
        if not isinstance(self.scheme, QuantScheme):
            raise ConfigError("scheme", f"must be a QuantScheme, got {type(self.scheme).__name__}")
        from ..primitives.signround import check_scheme

        check_scheme(self.scheme)
        if not 0 <= check_int("iters", self.iters) <= 100000:
            raise ConfigError("iters", f"must be an integer in [0, 100000], got {self.iters}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not 0 < self.lr <= 1):
            raise ConfigError("lr", f"must be a number in (0, 1] or null (1 / iters), got {self.lr!r}")
        if check_int("batch_size", self.batch_size) < 1:
            raise ConfigError("batch_size", f"must be a positive integer, got {self.batch_size}")
        check_int("seed", self.seed)

    @property
    def step_lr(self) -> float:
        """The first step's size."""
        return float(self.lr) if self.lr is not None else (1.0 / self.iters if self.iters else 0.0)
