"""Wanda and SparseGPT on a transformers decoder, one block at a time on the block pipeline.

For each decoder block (:func:`prune_block`): the input statistics of its chosen linears are
collected over the real calibration tokens (linears reading the same tensor, q/k/v and gate/up,
share one; summed across processes): Wanda needs only the diagonal ``||X_j||^2``, SparseGPT the
Hessian ``H = 2 X^T X / T``. The linears are pruned, and the pipeline runs the block again with its
pruned weights: those outputs are the next block's inputs.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from ..nn.pruned_linear import PrunedLinear
from ..pipeline.context import BlockContext
from ..pipeline.engine import BlockStep, run_in_memory
from ..pipeline.skeleton import find_blocks
from ..primitives.sparsity import sparsegpt_prune, wanda_mask
from ..targets import set_submodule
from .config import SparseGPTConfig, WandaConfig

log = logging.getLogger(__name__)


def _prune_one(cfg, w: torch.Tensor, stat, name: str):
    """(keep mask, new weight or None) for one linear from its input statistic."""
    if isinstance(cfg, WandaConfig):
        norm = stat.sum.clamp_min(0).sqrt()  # diag statistic: sum_t x_tj^2
        return wanda_mask(w, norm.to(w.device), cfg.sparsity, n=cfg.n, m=cfg.m, name=name), None
    res = sparsegpt_prune(w, stat.hessian().to(w.device), cfg.sparsity, n=cfg.n, m=cfg.m, block_size=cfg.block_size,
                          damp=cfg.damp, name=name)
    if res.fallback:
        log.warning("%s: Hessian not positive definite even with 1000x damping; fell back to magnitude pruning", name)
    return res.mask, res.weight


@torch.no_grad()
def prune_block(ctx: BlockContext, cfg: WandaConfig | SparseGPTConfig, linears: dict[str, nn.Module], *,
                on_module: Callable | None = None) -> None:
    """Prune ``linears`` (name in the block -> plain or pruned linear) of ``ctx.block`` in place."""
    if not linears:
        return
    shared = ctx.linear_groups(linears)
    kind = "diag" if isinstance(cfg, WandaConfig) else "hessian"
    stats = ctx.collect({sub[0]: linears[sub[0]] for sub in shared}, kind)
    for sub in shared:
        for n in sub:
            lin, full = linears[n], ctx.prefix + n
            w = lin.weight.detach().float()
            keep, new_w = _prune_one(cfg, w, stats[sub[0]], f"{full}.weight")
            keep = keep.to(lin.weight.device)
            keep = keep & lin.mask if isinstance(lin, PrunedLinear) else keep  # pruning twice never revives a weight
            new = PrunedLinear.from_linear(lin, keep, weight=new_w, nm=cfg.nm, name=f"{full}.weight")
            set_submodule(ctx.block, n, new)
            if on_module is not None:
                on_module(full, lin, new)
        del stats[sub[0]]  # one Hessian at a time stays alive


def prune_step(cfg, select: Callable[[nn.Module, str], dict], *, on_module: Callable | None = None) -> BlockStep:
    """Wanda / SparseGPT as a step of the block pipeline; ``select(block, prefix)`` picks the linears."""
    def apply(ctx: BlockContext) -> None:
        prune_block(ctx, cfg, select(ctx.block, ctx.prefix), on_module=on_module)

    return BlockStep(apply, needs_forward=True, name=type(cfg).__name__)


@torch.no_grad()
def prune_sequential(model: nn.Module, cfg: WandaConfig | SparseGPTConfig, calib, chosen: dict, *,
                     on_module=None, batch_size: int = 8, on_block=None, state_dir=None, offload_dir=None,
                     fingerprint_extra=()) -> nn.Module:
    """Prune ``chosen`` (name -> linear) of an in-memory model block by block. With ``state_dir`` every
    finished block is recorded and a later call with the same model, data and config continues after
    the last finished one; ``offload_dir`` keeps block activations on disk."""
    prefix, blocks = find_blocks(model)
    outside = [n for n in chosen if not n.startswith(prefix + ".")]
    if outside:
        log.warning("%s: %d chosen linear(s) outside the decoder blocks are left dense: %s",
                    type(cfg).__name__, len(outside), ", ".join(outside[:3]))
    state = None
    if state_dir is not None:
        from ..calibration.resume import BlockState, run_fingerprint

        state = BlockState(state_dir, run_fingerprint(model, calib, cfg, tuple(chosen), fingerprint_extra))

    def select(block, bprefix):
        return {n[len(bprefix):]: m for n, m in chosen.items() if n.startswith(bprefix)}

    def restore(b, modules):
        for n, new in modules.items():
            full = f"{prefix}.{b}.{n}"
            old = model.get_submodule(full)
            set_submodule(model, full, new.to(old.weight.device))
            if on_module is not None:
                on_module(full, old, new)

    run_in_memory(model, [prune_step(cfg, select, on_module=on_module)], calib, batch_size=batch_size, state=state,
                  offload_dir=offload_dir, on_block=on_block, restore=restore)
    return model
