"""Kernel choice. ``TORCHCOMPRESS_KERNEL=reference`` forces the pure-PyTorch path everywhere.

Read on each call (cheap) instead of cached in a module global, so tests can flip it with
``monkeypatch.setenv`` and no process-wide switch exists.
"""

from __future__ import annotations

import enum
import os

import torch

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


def run_op(op, impl, x: torch.Tensor, *args):
    """``op(x, *args)`` for one of our custom ops; in plain eager inference (no autograd recording,
    a plain tensor, not being compiled or traced) ``impl``, the Python function the op runs, is
    called directly. Same result, without the dispatcher's 15-50 us per call: a decode step of a
    30-block model makes about 200 of these calls."""
    if (not torch.is_grad_enabled() and type(x) is torch.Tensor and x.device.type != "meta"
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
        return impl(x, *args)
    return op(x, *args)
