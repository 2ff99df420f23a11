"""AWQ's config (recipe kind ``awq``): activation-aware scales (and clip) searched per decoder block.

The stage only rescales and clips float weights (the model's float function is unchanged by the
scales); a following ``rtn``, ``gptq`` or ``gguf`` stage quantizes. ``scheme`` is the quantizer the
search assumes: give it the following stage's bits and groups.

Example::

    from torchcompress.quant.awq import awq_model
    awq_model(model, AWQConfig(QuantScheme(bits=4, group_size=128, symmetric=False)), calib)
    tc.quantize_(model, RTNConfig(QuantScheme(bits=4, group_size=128, symmetric=False)))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import Granularity, QuantScheme
from ..errors import ConfigError


@dataclass(frozen=True)
class AWQConfig:
    """``grid``: points of the scale search (s = 1 and ``grid - 1`` exponents alpha in [0, 1]: llm-compressor's
    default 20); ``clip``: AutoAWQ's weight clip search after the scales (not on q_proj/k_proj, whose
    outputs feed the attention scores); ``clip_grid``, ``max_shrink``: its range shrinks ``1 - i / clip_grid``
    for ``i < max_shrink * clip_grid`` (AutoAWQ: 20, 0.5)."""

    scheme: QuantScheme = field(default_factory=lambda: QuantScheme(bits=4, group_size=128, symmetric=False))
    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.scheme, QuantScheme):
            raise ConfigError("scheme", f"must be a QuantScheme, got {type(self.scheme).__name__}")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 2:
            raise ConfigError("grid", f"must be an integer >= 2 (s = 1 and at least one alpha), got {self.grid!r}")
        if not isinstance(self.clip, bool):
            raise ConfigError("clip", f"must be true or false, got {self.clip!r}")
        if isinstance(self.clip_grid, bool) or not isinstance(self.clip_grid, int) or self.clip_grid < 1:
            raise ConfigError("clip_grid", f"must be a positive integer, got {self.clip_grid!r}")
        m = self.max_shrink
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            raise ConfigError("max_shrink", f"must be a number in [0, 1), got {m!r}")
        if self.clip and self.scheme.granularity is Granularity.TENSOR:
            raise ConfigError("clip", "needs a per-group or per-channel scheme (set clip: false for per-tensor)")
