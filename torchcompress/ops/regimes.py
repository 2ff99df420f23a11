"""Which W4A16 kernel runs at which batch: the crossovers between the three GPU regimes.

The weight-only kernels (``torchcompress::int_linear``, ``gptq_linear``, ``gguf_linear`` on CUDA)
come in one family per batch regime (:mod:`torchcompress.ops.triton.int_linear`):

* ``GEMV`` (batch <= ``gemv_max_m``): split-K GEMV; every packed word is read once for all rows of x;
* ``DOT`` (batch <= ``dot_max_m``): ``tl.dot`` tiles unpacking the codes in registers in a pipelined K loop;
* ``DEQUANT`` (above): the weight dequantized once per call to x's dtype, then the GEMM of torch.

Where one regime overtakes the next depends on the GPU, so the crossovers are held per device
(:data:`DEVICE_CROSSOVERS`, keyed by ``torch.cuda.get_device_name``), with :data:`DEFAULT_CROSSOVERS`
for any other device, and can be overridden per process with ``TORCHCOMPRESS_CROSSOVERS=gemv=8,dot=128``
(read on each call, no process-wide switch). ``benchmarks/bench_triton.py`` times every regime at
each batch and writes the crossovers it measured next to the table in effect.

Pure Python: importing this module never imports triton.
"""

from __future__ import annotations

import enum
import functools
import os
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Mapping, Optional

from ..errors import ConfigError

ENV_VAR = "TORCHCOMPRESS_CROSSOVERS"


class Regime(str, enum.Enum):
    GEMV = "gemv"
    DOT = "dot"
    DEQUANT = "dequant"


@dataclass(frozen=True)
class Crossovers:
    """Largest batch (rows of x) for the GEMV regime and for the ``tl.dot`` regime."""

    gemv_max_m: int = 8
    dot_max_m: int = 128

    def __post_init__(self):
        for field in ("gemv_max_m", "dot_max_m"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(field, f"must be a non-negative integer, got {v!r}")
        if self.dot_max_m < self.gemv_max_m:
            raise ConfigError("dot_max_m", f"must be >= gemv_max_m ({self.gemv_max_m}), got {self.dot_max_m}"
                              " (set them equal to skip the tl.dot regime)")

    def as_dict(self) -> dict:
        return asdict(self)


# Defaults, not measurements: the split-K GEMV up to 8 rows (the decode regime; the previous
# word-reading GEMV still beat the old tiled kernel at 16 rows on an H100), tl.dot up to 128.
DEFAULT_CROSSOVERS = Crossovers()

# device name -> crossovers measured by benchmarks/bench_triton.py on that device ("suggested_crossovers"
# in its JSON). Empty until a GPU run has measured them: never enter a number no run produced.
DEVICE_CROSSOVERS: Mapping[str, Crossovers] = MappingProxyType({})


@functools.lru_cache(maxsize=32)
def parse_crossovers(text: str) -> Crossovers:
    """``"gemv=8,dot=128"`` (either key may be left out: the default) -> :class:`Crossovers`."""
    keys = {"gemv": "gemv_max_m", "dot": "dot_max_m"}
    vals = asdict(DEFAULT_CROSSOVERS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or key.strip() not in keys or not raw.strip().isdigit():
            raise ConfigError(ENV_VAR, f"expected entries like gemv=8,dot=128, got {part!r}")
        vals[keys[key.strip()]] = int(raw)
    return Crossovers(**vals)


def crossovers_for(device_name: Optional[str], table: Mapping[str, Crossovers] = DEVICE_CROSSOVERS,
                   env: Optional[Mapping[str, str]] = None) -> Crossovers:
    """The crossovers in effect for ``device_name``: ``TORCHCOMPRESS_CROSSOVERS`` if set, else the
    table's entry for the device, else :data:`DEFAULT_CROSSOVERS`."""
    raw = (os.environ if env is None else env).get(ENV_VAR, "").strip()
    if raw:
        return parse_crossovers(raw)
    if device_name is not None and device_name in table:
        return table[device_name]
    return DEFAULT_CROSSOVERS


def choose_regime(m: int, crossovers: Crossovers) -> Regime:
    """The regime for a batch of ``m`` rows."""
    if m <= crossovers.gemv_max_m:
        return Regime.GEMV
    if m <= crossovers.dot_max_m:
        return Regime.DOT
    return Regime.DEQUANT


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def device_name(device) -> Optional[str]:
    """``torch.cuda.get_device_name`` for a CUDA device (cached: no driver call per op), else None."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


def regime_for(m: int, device) -> Regime:
    """The dispatcher: the regime for ``m`` rows of x on ``device``."""
    return choose_regime(m, crossovers_for(device_name(device)))
