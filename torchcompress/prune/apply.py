"""``prune_``: apply a pruning config to a model in place (dispatch keyed by config type)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.pruned_linear import PrunedLinear
from ..primitives.sparsity import global_magnitude_masks, magnitude_mask
from ..targets import select_modules, set_submodule
from .config import (
    MagnitudePruneConfig,
    SparseGPTConfig,
    StructuredPruneConfig,
    WandaConfig,
)

log = logging.getLogger(__name__)


def prunable(model: nn.Module, targets, ignore) -> dict[str, nn.Linear]:
    """The chosen linears (plain or already pruned), one name per module."""
    out, seen = {}, set()
    for name, m in select_modules(model, targets, ignore):
        if type(m) in (nn.Linear, PrunedLinear) and id(m) not in seen:
            seen.add(id(m))
            out[name] = m
    return out


def combined_mask(linear: nn.Linear, keep: torch.Tensor) -> torch.Tensor:
    """A new keep-mask on top of an existing one (pruning twice never revives a weight)."""
    keep = keep.to(linear.weight.device)
    return keep & linear.mask if isinstance(linear, PrunedLinear) else keep


def install(model: nn.Module, name: str, linear: nn.Linear, keep: torch.Tensor, weight=None, nm=None,
            on_module: Callable | None = None) -> PrunedLinear:
    new = PrunedLinear.from_linear(linear, combined_mask(linear, keep), weight=weight, nm=nm, name=f"{name}.weight")
    set_submodule(model, name, new)
    if on_module is not None:
        on_module(name, linear, new)
    return new


def _magnitude(model, cfg: MagnitudePruneConfig, chosen: dict, calib, on_module, **_):
    if cfg.scope == "global":
        masks = global_magnitude_masks({n: m.weight.detach() for n, m in chosen.items()}, cfg.sparsity)
    else:
        masks = {n: magnitude_mask(m.weight.detach(), cfg.sparsity, n=cfg.n, m=cfg.m, name=f"{n}.weight")
                 for n, m in chosen.items()}
    for n, lin in chosen.items():
        install(model, n, lin, masks[n], nm=cfg.nm, on_module=on_module)


def _sequential(model, cfg, chosen: dict, calib, on_module, batch_size: int = 8, state_dir=None, **_):
    from .sequential import prune_sequential

    prune_sequential(model, cfg, calib, chosen, on_module=on_module, batch_size=batch_size, state_dir=state_dir,
                     offload_dir=getattr(calib, "offload_dir", None))


def _structured(model, cfg, chosen: dict, calib, on_module, batch_size: int = 8, **_):
    from .structured import prune_structured

    prune_structured(model, cfg, calib, chosen, on_module=on_module, batch_size=batch_size)


_PRUNERS: dict[type, Callable] = {MagnitudePruneConfig: _magnitude, WandaConfig: _sequential,
                                  SparseGPTConfig: _sequential, StructuredPruneConfig: _structured}


@torch.no_grad()
def prune_(model: nn.Module, config, *, targets: Iterable = (nn.Linear,), ignore: Iterable | None = None,
           calib_data=None, on_module: Callable | None = None, batch_size: int = 8, state_dir=None) -> nn.Module:
    """Prune the matching linears of ``model`` in place; return it.

    Unstructured and N:M pruning replace each chosen ``nn.Linear`` with a :class:`PrunedLinear`
    (mask in forward). Structured pruning shrinks the model. ``ignore=None`` means the default of the
    quantize verb (``lm_head`` and embeddings). ``calib_data`` (a CalibrationSet) is required by
    Wanda, SparseGPT and activation importance. ``state_dir``: Wanda/SparseGPT record each finished
    decoder block there and a repeated call with the same model, data and config resumes after it.
    """
    from ..ignore import DEFAULT_IGNORE

    fn = _PRUNERS.get(type(config))
    if fn is None:
        raise ConfigError("config", f"prune_ does not handle {type(config).__name__}")
    if getattr(config, "needs_calibration", False) and calib_data is None:
        raise ConfigError("calib_data", f"{type(config).__name__} needs calibration data: pass a CalibrationSet "
                          "(torchcompress.calibration.build_calibration) or use the CLI's --calib")
    ignore = DEFAULT_IGNORE if ignore is None else ignore
    chosen = prunable(model, targets, ignore)
    if not chosen:
        log.warning("prune_: no nn.Linear matched targets=%r ignore=%r", targets, ignore)
        return model
    fn(model, config, chosen, calib_data, on_module, batch_size=batch_size, state_dir=state_dir)
    return model


def make_permanent_(model: nn.Module) -> nn.Module:
    """Replace every :class:`PrunedLinear` with a plain ``nn.Linear`` holding the zeroed weight."""
    for name, m in list(model.named_modules()):
        if isinstance(m, PrunedLinear):
            set_submodule(model, name, m.make_permanent())
    return model
