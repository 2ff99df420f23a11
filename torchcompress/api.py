"""Entry verbs: in place on any ``nn.Module``, returning the model.

Example::

    import torchcompress as tc
    tc.quantize_(model, tc.RTNConfig(tc.QuantScheme(bits=4, group_size=128)))
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch.nn as nn

from .config import QATConfig, QuantScheme, RTNConfig
from .errors import ConfigError
from .nn.pruned_linear import PrunedLinear
from .nn.quant_linear import QuantLinear
from .targets import select_modules, set_submodule

log = logging.getLogger(__name__)

from .ignore import DEFAULT_IGNORE  # noqa: E402,F401  (public here too)


def _rtn(linear: nn.Linear, cfg: RTNConfig, name: str) -> nn.Module:
    return QuantLinear.from_linear(linear, cfg.scheme, name=f"{name}.weight")


def _qat(linear: nn.Linear, cfg: QATConfig, name: str) -> nn.Module:
    return QuantLinear.from_linear(linear, cfg.scheme, qat=True, name=f"{name}.weight",
                                   learnable_scale=cfg.learnable_scale)


# dispatch keyed by config *type*; later techniques add their config classes here.
_TRANSFORMS: dict[type, Callable] = {RTNConfig: _rtn, QATConfig: _qat}


def _gguf_qat(linear: nn.Linear, cfg, name: str) -> nn.Module:  # QAT with a GGUF block type (issue #7)
    from .training.gguf_qat import gguf_qat_module

    return gguf_qat_module(linear, cfg, name)


from .training.config import GGUFQATConfig  # noqa: E402

_TRANSFORMS[GGUFQATConfig] = _gguf_qat


def _hqq(linear: nn.Linear, cfg, name: str) -> nn.Module:  # data-free HQQ (issue #22)
    from .primitives.hqq import quantize_hqq

    return QuantLinear.from_quantized(linear, cfg.scheme, quantize_hqq(linear.weight, cfg.scheme, name=f"{name}.weight",
                                                                     **cfg.solver_options()))


from .config import HQQConfig  # noqa: E402

_TRANSFORMS[HQQConfig] = _hqq


def _scheme(linear: nn.Linear, cfg, name: str) -> nn.Module:  # FP8 / INT8 W8A8 / FP4 (issue #21)
    from .quant.schemes import scheme_module

    return scheme_module(linear, cfg, name)


from .quant.scheme_config import FP4Config, FP8Config, W8A8Int8Config  # noqa: E402

_TRANSFORMS.update({FP8Config: _scheme, W8A8Int8Config: _scheme, FP4Config: _scheme})


def quantize_(
    model: nn.Module,
    config: RTNConfig | QATConfig | QuantScheme,
    *,
    targets: Iterable = (nn.Linear,),
    ignore: Iterable | None = None,
    on_module: Callable[[str, nn.Module, nn.Module], None] | None = None,
) -> nn.Module:
    """Replace every matching ``nn.Linear`` of ``model`` with a :class:`QuantLinear`, in place.

    ``ignore=None`` means :data:`DEFAULT_IGNORE` (``lm_head`` and embeddings); pass ``()`` to quantize
    everything. ``on_module(name, old, new)`` is called after each replacement (reports use it).
    A QuantScheme alone means RTN with that scheme.
    """
    if isinstance(config, QuantScheme):
        config = RTNConfig(config)
    fn = _TRANSFORMS.get(type(config))
    if fn is None:
        raise ConfigError("config", f"quantize_ does not handle {type(config).__name__}")
    ignore = DEFAULT_IGNORE if ignore is None else ignore
    from .pipeline.experts import unfuse_experts_

    unfuse_experts_(model)  # transformers 5's fused MoE experts (3-D tensors) become one nn.Linear per projection
    # a pruned layer is quantized with its mask folded in: a zero weight stays exactly zero after
    # quantization (code 0 symmetric, the integer zero point asymmetric), so the sparsity survives
    chosen = [(n, m) for n, m in select_modules(model, targets, ignore) if type(m) in (nn.Linear, PrunedLinear)]
    if not chosen:
        log.warning("quantize_: no nn.Linear matched targets=%r ignore=%r", targets, ignore)
    done: dict[int, nn.Module] = {}  # a Linear shared under several names gets one replacement
    for name, linear in chosen:
        new = done.get(id(linear))
        fresh = new is None
        if fresh:
            src = linear.make_permanent() if isinstance(linear, PrunedLinear) else linear
            new = done[id(linear)] = fn(src, config, name)
        set_submodule(model, name, new)
        if fresh and on_module is not None:
            on_module(name, linear, new)
    return model


def freeze_(model: nn.Module) -> nn.Module:
    """Pack every fake-quant :class:`QuantLinear` (after QAT), in place; GGUF fake-quant layers
    (``GGUFQATConfig``) are replaced by their :class:`GGUFLinear`."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.freeze(name=f"{name}.weight")
    import sys

    if "torchcompress.nn.gguf_qat" in sys.modules:  # GGUFQATLinear -> GGUFLinear (GGUF-type QAT)
        sys.modules["torchcompress.nn.gguf_qat"].freeze_gguf_qat_(model)
    return model


def add_lora_(model: nn.Module, config, *, targets: Iterable | None = None, ignore: Iterable = ("lm_head",),
              freeze_base: bool = True) -> nn.Module:
    """Wrap matching layers (float or quantized) in LoRALinear adapters, in place (see ``torchcompress.lowrank``).

    >>> add_lora_(model, LoRAConfig(targets=("q_proj", "v_proj"), r=8, alpha=16))
    """
    from .lowrank.lora import add_lora_ as _add_lora

    return _add_lora(model, config, targets=targets, ignore=ignore, freeze_base=freeze_base)


def lowrank_(model: nn.Module, config, *, targets: Iterable = (nn.Linear,), ignore: Iterable | None = None,
             calib_data=None) -> nn.Module:
    """Replace matching ``nn.Linear`` layers by truncated-SVD LowRankLinear pairs, in place.

    >>> lowrank_(model, SVDConfig(param_ratio=0.5, activation_aware=True), targets=["re:.*mlp.*"], calib_data=calib)
    """
    from .lowrank.svd import lowrank_ as _lowrank

    return _lowrank(model, config, targets=targets, ignore=DEFAULT_IGNORE if ignore is None else ignore,
                    calib_data=calib_data)


def prune_(model: nn.Module, config, *, targets: Iterable = (nn.Linear,), ignore: Iterable | None = None,
           calib_data=None, on_module: Callable[[str, nn.Module, nn.Module], None] | None = None) -> nn.Module:
    """Prune ``model`` in place with a config from :mod:`torchcompress.prune` (magnitude, Wanda,
    SparseGPT, structured); ``calib_data`` (a CalibrationSet) for the calibrated ones."""
    from .prune.apply import prune_ as _prune

    return _prune(model, config, targets=targets, ignore=ignore, calib_data=calib_data, on_module=on_module)
