"""Plain-loop hooks for :func:`~.loop.train` (or any loop that calls them): QAT prepare/freeze.

Example::

    qat = QATHook(QATConfig(QuantScheme(bits=3, group_size=128, symmetric=False)))
    train(model, data, loss_fn, settings, hooks=[qat])   # prepares before the optimizer, packs at the end
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..api import freeze_, quantize_
from ..config import QATConfig
from ..errors import ConfigError
from ..nn.quant_linear import QuantLinear
from .config import GGUFQATConfig


def is_qat_prepared(model: nn.Module) -> bool:
    """True when the model has fake-quant layers (integer QuantLinear or GGUF GGUFQATLinear)."""
    from ..nn.gguf_qat import GGUFQATLinear

    return any((isinstance(m, QuantLinear) and not m.is_packed) or isinstance(m, GGUFQATLinear) for m in model.modules())


class QATHook:
    """``on_train_begin``: fake-quantize the targeted Linears (skipped when the model already has
    fake-quant layers, e.g. a resumed run); ``on_train_end``: pack them (``freeze=True``; GGUF
    fake-quant layers become GGUFLinear)."""

    def __init__(self, config: QATConfig | GGUFQATConfig, *, targets: Iterable = (nn.Linear,), ignore: Iterable | None = None,
                 freeze: bool = True):
        if not isinstance(config, (QATConfig, GGUFQATConfig)):
            raise ConfigError("config", f"QATHook needs a QATConfig or GGUFQATConfig, got {type(config).__name__}")
        self.config, self.targets, self.ignore, self.freeze = config, tuple(targets), ignore, freeze

    def on_train_begin(self, model: nn.Module) -> None:
        if not is_qat_prepared(model):
            quantize_(model, self.config, targets=self.targets, ignore=self.ignore)

    def on_train_end(self, model: nn.Module) -> None:
        if self.freeze:
            freeze_(model)
