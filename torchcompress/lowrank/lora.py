"""``add_lora_``: wrap the matching layers of a model in :class:`LoRALinear`, freeze the rest.

Example::

    add_lora_(model, LoRAConfig(targets=("q_proj", "v_proj"), r=8, alpha=16))
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-3)
    ...
    merge_lora_(model)          # fold the adapters in (re-quantizing quantized bases)
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..nn.lora_linear import LoRALinear, MergeError
from ..targets import select_modules, set_submodule
from .config import LoRAConfig

log = logging.getLogger(__name__)


def lora_base_types() -> tuple[type, ...]:
    """Layer types a LoRA adapter can wrap."""
    from ..nn.gguf_linear import GGUFLinear
    from ..nn.quant_linear import QuantLinear  # GPTQLinear is a subclass

    return (nn.Linear, QuantLinear, GGUFLinear)


def add_lora_(
    model: nn.Module,
    config: LoRAConfig,
    *,
    targets: Iterable | None = None,
    ignore: Iterable = ("lm_head",),
    freeze_base: bool = True,
    on_module: Callable[[str, nn.Module, nn.Module], None] | None = None,
) -> nn.Module:
    """Wrap every matching Linear-like layer in a :class:`LoRALinear`, in place.

    ``targets=None`` uses ``config.targets``. Modules are visited in ``named_modules`` order, as in
    PEFT, so a seed gives the same adapters. ``freeze_base`` sets ``requires_grad=False`` on every
    parameter that is not a LoRA A/B (PEFT's default).
    """
    if not isinstance(config, LoRAConfig):
        raise ConfigError("config", f"add_lora_ needs a LoRAConfig, got {type(config).__name__}")
    kinds = lora_base_types()
    chosen = [(n, m) for n, m in select_modules(model, config.targets if targets is None else targets, ignore)
              if isinstance(m, kinds) and not isinstance(m, LoRALinear)]
    # a module matched by name that is not Linear-like is skipped (PEFT raises only if nothing matches)
    if not chosen:
        raise ConfigError("targets", f"no Linear-like module matched {config.targets if targets is None else targets!r}")
    if freeze_base:
        model.requires_grad_(False)
    done: dict[int, LoRALinear] = {}
    for name, base in chosen:
        new = done.get(id(base))
        if new is None:
            new = done[id(base)] = LoRALinear(base, config.r, config.alpha, config.dropout, config.use_rslora, config.init)
            if on_module is not None:
                on_module(name, base, new)
        set_submodule(model, name, new)
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (A and B of every LoRALinear)."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


@torch.no_grad()
def merge_lora_(model: nn.Module, *, unload: bool = True) -> dict[str, MergeError | None]:
    """Merge every adapter into its base; with ``unload`` replace each LoRALinear by its base.

    Returns ``{module name: MergeError or None}`` (None: dense float base, merged exactly; a pruned base
    or a quantized one reports what the merge lost)."""
    errors = {}
    for name, m in lora_modules(model):
        errors[name] = m.merge(name=f"{name}.weight")
        if unload:
            set_submodule(model, name, m.base_layer)
        if errors[name] is not None:
            e = errors[name]
            log.info("merge %s into %s: merged-weight SQNR %.1f dB, max |err| %.3g", name, e.base_kind, e.sqnr_db, e.max_abs)
    return errors


@torch.no_grad()
def unmerge_lora_(model: nn.Module) -> nn.Module:
    for _, m in lora_modules(model):
        m.unmerge()
    return model
