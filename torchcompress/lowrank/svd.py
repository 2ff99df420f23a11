"""``lowrank_``: factorize Linear layers by truncated SVD (plain or activation-aware).

Activation-aware runs need ``X^T X`` of every chosen layer's inputs: gathered block by block with
the layer-by-layer calibration runner (one decoder block's activations in memory at a time, real
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
from ..primitives import svd as svdm
from ..targets import select_modules, set_submodule
from .config import SVDConfig

log = logging.getLogger(__name__)


@torch.no_grad()
def input_second_moments(model: nn.Module, names: list[str], calib, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{name: X^T X}`` (K, K) float64 over the real calibration tokens seen by each named Linear."""
    from ..calibration.runner import _HessianHooks, _run_block, capture_first_inputs, decoder_blocks

    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    outside = [n for n in names if not any(n.startswith(f"{prefix}.{b}.") for b in range(len(blocks)))]
    if outside:
        raise InputError(f"activation-aware SVD: {outside[0]} is outside the decoder blocks; "
                         "exclude it (ignore) or use plain SVD")
    dev = next(model.parameters()).device
    inputs = capture_first_inputs(model, blocks, calib.batches(batch_size))
    out: dict[str, torch.Tensor] = {}
    for b, block in enumerate(blocks):
        bprefix = f"{prefix}.{b}."
        mine = {n[len(bprefix):]: block.get_submodule(n[len(bprefix):]) for n in names if n.startswith(bprefix)}
        hooks = _HessianHooks(mine) if mine else None
        try:
            for i in range(len(inputs.hidden)):
                if hooks is not None:
                    hooks.mask = inputs.masks[i].bool()
                inputs.hidden[i] = _run_block(block, inputs, i, dev).detach().cpu()  # next block's inputs
        finally:
            if hooks is not None:
                hooks.remove()
        for n in mine:
            out[bprefix + n] = hooks.h[n]  # sum of x x^T (float64); the scale does not change the SVD
        log.debug("svd: statistics of block %d/%d", b + 1, len(blocks))
    return out


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
