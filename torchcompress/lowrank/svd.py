"""``lowrank_``: factorize Linear layers by truncated SVD (plain or activation-aware).

Activation-aware runs need ``X^T X`` of every chosen layer's inputs: gathered block by block with
the block pipeline (one decoder block's activations in memory at a time, real
tokens only), from the *original* model, before any layer is replaced. Then ranks are chosen
(explicit, by energy, by parameter ratio, or under one global budget) and every layer is factorized.

Example::

    lowrank_(model, SVDConfig(param_ratio=0.5, activation_aware=True), targets=["re:.*mlp.*"], calib_data=calib)
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..errors import ConfigError, InputError, NumericError
from ..nn.lowrank_linear import LowRankLinear
from ..pipeline.engine import BlockStep, run_in_memory
from ..pipeline.skeleton import find_blocks
from ..primitives import svd as svdm
from ..targets import select_modules, set_submodule
from .config import SVDConfig

log = logging.getLogger(__name__)


@torch.no_grad()
def input_second_moments(model: nn.Module, names: list[str], calib, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{name: X^T X}`` (K, K) float64 over the real calibration tokens seen by each named Linear of
    the unmodified model (block pipeline; summed across processes under torch.distributed)."""
    prefix, blocks = find_blocks(model)
    outside = [n for n in names if not any(n.startswith(f"{prefix}.{b}.") for b in range(len(blocks)))]
    if outside:
        raise InputError(f"activation-aware SVD: {outside[0]} is outside the decoder blocks; "
                         "exclude it (ignore) or use plain SVD")
    out: dict[str, torch.Tensor] = {}

    def apply(ctx):
        mine = {n[len(ctx.prefix):]: model.get_submodule(n) for n in names if n.startswith(ctx.prefix)}
        if mine:  # the sum of x x^T (float64); the scale does not change the SVD
            out.update({ctx.prefix + n: s.sum for n, s in ctx.collect(mine, "hessian").items()})

    run_in_memory(model, [BlockStep(apply, name="svd-statistics")], calib, batch_size=batch_size)
    return out


def svd_step(config: SVDConfig, targets, ignore, on_module=None) -> BlockStep:
    """Truncated SVD of one block's linears as a step of the block pipeline (per-layer ranks; the
    ``global`` allocation needs every layer's spectrum first and runs on an in-memory model only).
    Activation-aware statistics come from the original model: the block passes on its uncompressed outputs."""
    from ..pipeline.view import block_view

    def apply(ctx):
        view = block_view(ctx.prefix, ctx.block)
        layers = {n: m for n, m in select_modules(view, targets, ignore) if type(m) is nn.Linear}
        if not layers:
            return
        sm = None
        if config.activation_aware:
            stats = ctx.collect({n[len(ctx.prefix):]: m for n, m in layers.items()}, "hessian")
            sm = {ctx.prefix + n: s.sum for n, s in stats.items()}
        lowrank_(view, config, targets=targets, ignore=ignore, second_moments=sm, on_module=on_module)

    return BlockStep(apply, needs_forward=config.activation_aware, propagate_original=True, name="svd")


def _choose_ranks(cfg: SVDConfig, layers: dict[str, nn.Linear], spectra: dict[str, torch.Tensor]) -> dict[str, int]:
    if cfg.allocation == "global":
        names = list(layers)
        shapes = [(layers[n].out_features, layers[n].in_features) for n in names]
        budget = int(cfg.param_ratio * sum(a * b for a, b in shapes))
        return dict(zip(names, svdm.allocate_ranks([spectra[n] for n in names], shapes, budget)))
    ranks = {}
    for n, lin in layers.items():
        N, K = lin.out_features, lin.in_features
        if cfg.rank is not None:
            ranks[n] = min(cfg.rank, N, K)
        elif cfg.energy is not None:
            ranks[n] = svdm.rank_for_energy(spectra[n], cfg.energy)
        else:
            ranks[n] = svdm.rank_for_ratio(N, K, cfg.param_ratio)
    return ranks


@torch.no_grad()
def lowrank_(
    model: nn.Module,
    config: SVDConfig,
    *,
    targets: Iterable = (nn.Linear,),
    ignore: Iterable = ("lm_head", "re:.*embed.*"),
    calib_data=None,
    second_moments: dict[str, torch.Tensor] | None = None,
    on_module: Callable[[str, nn.Module, nn.Module], None] | None = None,
) -> nn.Module:
    """Replace every matching ``nn.Linear`` by a :class:`LowRankLinear`, in place.

    Layers whose chosen rank would not save parameters (``r * (N + K) >= N * K``) stay dense.
    ``on_module(name, old, new)`` is called after each replacement; ``new.svd_info`` holds the
    rank, the discarded energy and (activation-aware) the damping used. ``second_moments``: ``X^T X``
    per layer name from :func:`input_second_moments`, to reuse one calibration pass in a sweep."""
    if not isinstance(config, SVDConfig):
        raise ConfigError("config", f"lowrank_ needs an SVDConfig, got {type(config).__name__}")
    layers = {n: m for n, m in select_modules(model, targets, ignore) if type(m) is nn.Linear}
    if not layers:
        raise ConfigError("targets", f"no nn.Linear matched targets={targets!r} ignore={ignore!r}")
    from ..primitives.affine import check_finite

    for n, lin in layers.items():
        check_finite(lin.weight.detach(), f"{n}.weight")  # NaN/Inf would make the SVD fail opaquely
    chol: dict[str, tuple[torch.Tensor, float]] = {}
    if config.activation_aware:
        if calib_data is None and second_moments is None:
            raise ConfigError("calib_data", "activation-aware SVD needs calibration data (a CalibrationSet)")
        if second_moments is None:
            second_moments = input_second_moments(model, list(layers), calib_data)
        missing = [n for n in layers if n not in second_moments]
        if missing:
            raise ConfigError("second_moments", f"no X^T X for {missing[0]}")
        for n in layers:
            xtx = second_moments[n]
            if not torch.isfinite(xtx).all():
                raise NumericError(f"{n} (calibration inputs)", "activations hold NaN or Inf")
            try:
                chol[n] = svdm.cholesky_whitening(xtx, config.damp)
            except torch.linalg.LinAlgError:
                log.warning("%s: activations give no positive definite X^T X; plain SVD for this layer", n)
    spectra = {}
    if config.energy is not None or config.allocation == "global":
        for n, lin in layers.items():
            w = lin.weight.detach()
            spectra[n] = svdm.whitened_singular_values(w, chol[n][0]) if n in chol else torch.linalg.svdvals(w.double())
    ranks = _choose_ranks(config, layers, spectra)
    for n, lin in layers.items():
        N, K, r = lin.out_features, lin.in_features, ranks[n]
        if r > svdm.max_useful_rank(N, K):
            log.info("%s: rank %d would not save parameters over the dense (%d, %d) layer; kept dense", n, r, N, K)
            continue
        w = lin.weight.detach()
        f = svdm.whitened_svd_factors(w, chol[n][0], r) if n in chol else svdm.svd_factors(w, r)
        new = LowRankLinear.from_factors(f.up, f.down, lin.bias, dtype=w.dtype).to(w.device)
        new.requires_grad_(lin.weight.requires_grad)
        new.svd_info = {"rank": r, "discarded_energy": f.discarded_energy,
                        "total_energy": float(f.singular_values.square().sum()),
                        "whitening_damp": chol[n][1] if n in chol else None}
        set_submodule(model, n, new)
        if on_module is not None:
            on_module(n, lin, new)
    return model
