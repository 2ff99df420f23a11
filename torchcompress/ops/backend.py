"""Kernel choice. ``TORCHCOMPRESS_KERNEL=reference`` forces the pure-PyTorch path everywhere.

Read on each call (cheap) instead of cached in a module global, so tests can flip it with
``monkeypatch.setenv`` and no process-wide switch exists.
"""

from __future__ import annotations

import enum
import os

from ..errors import ConfigError

ENV_VAR = "TORCHCOMPRESS_KERNEL"


class Backend(str, enum.Enum):
    AUTO = "auto"  # the fastest implementation available for the device
    REFERENCE = "reference"  # pure PyTorch: dequantize, then F.linear


def selected_backend() -> Backend:
    raw = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    try:
        return Backend(raw)
    except ValueError:
        allowed = ", ".join(b.value for b in Backend)
        raise ConfigError(ENV_VAR, f"must be one of {allowed}, got {raw!r}") from None
