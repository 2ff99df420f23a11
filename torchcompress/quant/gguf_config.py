"""GGUFConfig: the ``gguf`` recipe stage's settings (kept import-light: config.py registers it)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..formats.gguf_mix import SUPPORTED


@dataclass(frozen=True)
class GGUFConfig:
    """``qtype``: a llama.cpp file type (Q4_K_M, Q8_0, ...); ``pure``: one type for every tensor;
    ``leave_output``: keep ``lm_head`` in float; ``imatrix``: importance-weighted quantization
    (llama.cpp's imatrix) from the recipe's calibration data."""

    qtype: str = "Q4_K_M"
    pure: bool = False
    leave_output: bool = False
    imatrix: bool = False

    @property
    def needs_calibration(self) -> bool:  # the CLI builds calibration data for such stages
        return self.imatrix

    def __post_init__(self):
        if not isinstance(self.qtype, str) or self.qtype.upper() not in SUPPORTED:
            raise ConfigError("qtype", f"must be one of {', '.join(SUPPORTED)}, got {self.qtype!r}")
        for name in ("pure", "leave_output", "imatrix"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
