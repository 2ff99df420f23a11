"""Apply the weight-and-activation schemes to a model: ``quantize_`` transforms and recipe stage runners.

``quantize_(model, FP8Config())`` (and W8A8Int8Config, FP4Config) replace Linears in place; stages that need
calibration (``smoothquant``; ``fp4`` NVFP4 with activations) gather their activation statistics with
:func:`..quant.act_stats.input_absmax` over the whole in-memory model first.

Example::

    from torchcompress.quant.schemes import apply_scheme_
    apply_scheme_(model, FP4Config("nvfp4"), calib)
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch.nn as nn

from ..nn.pruned_linear import PrunedLinear
from ..nn.scheme_linear import FP4Linear, FP8Linear, Int8Linear
from ..targets import select_modules, set_submodule
from .scheme_config import FP8Config, W8A8Int8Config

DEFAULT_IGNORE = ("lm_head", "re:.*embed.*")


def scheme_module(linear: nn.Linear, cfg, name: str, input_absmax=None) -> nn.Module:
    """The replacement of one Linear under ``cfg`` (the ``quantize_`` transform)."""
    wname = f"{name}.weight"
    if isinstance(cfg, FP8Config):
        return FP8Linear.from_linear(linear, cfg, wname)
    if isinstance(cfg, W8A8Int8Config):
        return Int8Linear.from_linear(linear, cfg, wname)
    return FP4Linear.from_linear(linear, cfg, wname, input_absmax=input_absmax)


def replace_linears(model: nn.Module, build: Callable[[str, nn.Linear], nn.Module], targets: Iterable = (nn.Linear,),
                    ignore: Iterable | None = None, on_module: Callable | None = None) -> list[str]:
    """Replace every ``nn.Linear`` (or PrunedLinear, its mask folded in: zeros stay exactly zero in every
    scheme) matching targets/ignore by ``build(name, linear)``; returns the names replaced."""
    ignore = DEFAULT_IGNORE if ignore is None else ignore
    chosen = [(n, m) for n, m in select_modules(model, targets, ignore) if type(m) in (nn.Linear, PrunedLinear)]
    done: dict[int, nn.Module] = {}
    for name, linear in chosen:
        new = done.get(id(linear))
        fresh = new is None
        if fresh:
            src = linear.make_permanent() if isinstance(linear, PrunedLinear) else linear
            new = done[id(linear)] = build(name, src)
        set_submodule(model, name, new)
        if fresh and on_module is not None:
            on_module(name, linear, new)
    return [n for n, _ in chosen]


def apply_scheme_(model: nn.Module, cfg, calib=None, *, targets: Iterable = (nn.Linear,),
                  ignore: Iterable | None = None, on_module: Callable | None = None) -> nn.Module:
    """FP8 / INT8 W8A8 / FP4 in place; NVFP4 with activations first measures each layer's input range
    (max |x| over the real tokens of ``calib``) for its static global scale."""
    stats = {}
    if getattr(cfg, "needs_calibration", False):
        from .act_stats import input_absmax

        names = [n for n, m in select_modules(model, targets, DEFAULT_IGNORE if ignore is None else ignore)
                 if type(m) in (nn.Linear, PrunedLinear)]
        stats = {n: a.max() for n, a in input_absmax(model, names, calib).items()}
    replace_linears(model, lambda n, lin: scheme_module(lin, cfg, n, stats.get(n)), targets, ignore, on_module)
    return model
