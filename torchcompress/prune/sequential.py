"""Wanda and SparseGPT on a transformers decoder, block by block (the GPTQ runner's pattern).

For each decoder block: hooks on its chosen linears accumulate ``X^T X`` over the real tokens of
the calibration batches (linears reading the same tensor, q/k/v and gate/up, share one), the
linears are pruned (Wanda from the diagonal, i.e. ``||X_j||^2``; SparseGPT from ``H = 2 X^T X / T``),
and the block is run again with its pruned weights: those outputs are the next block's inputs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..calibration.runner import (
    _HessianHooks,
    _linear_groups,
    _run_block,
    accumulate_hessians,
    capture_first_inputs,
    decoder_blocks,
)
from ..primitives.sparsity import sparsegpt_prune, wanda_mask
from .config import SparseGPTConfig, WandaConfig

log = logging.getLogger(__name__)


def _prune_one(cfg, w: torch.Tensor, hsum: torch.Tensor, tokens: int, name: str):
    """(keep mask, new weight or None) for one linear from its summed ``X^T X``."""
    if isinstance(cfg, WandaConfig):
        norm = hsum.diagonal().clamp_min(0).sqrt()
        return wanda_mask(w, norm, cfg.sparsity, n=cfg.n, m=cfg.m, name=name), None
    h = hsum * (2.0 / max(tokens, 1))
    res = sparsegpt_prune(w, h, cfg.sparsity, n=cfg.n, m=cfg.m, block_size=cfg.block_size, damp=cfg.damp, name=name)
    if res.fallback:
        log.warning("%s: Hessian not positive definite even with 1000x damping; fell back to magnitude pruning", name)
    return res.mask, res.weight


@torch.no_grad()
def prune_sequential(model: nn.Module, cfg: WandaConfig | SparseGPTConfig, calib, chosen: dict, *,
                     on_module=None, batch_size: int = 8, on_block=None, state_dir=None, offload_dir=None,
                     fingerprint_extra=()) -> nn.Module:
    """Prune ``chosen`` (name -> linear) block by block. With ``state_dir`` every finished block is
    recorded (:mod:`..calibration.resume`) and a later call with the same model, data and config
    continues after the last finished one; ``offload_dir`` keeps block activations on disk."""
    from ..calibration.offload import store_from
    from ..targets import set_submodule
    from .apply import install

    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    outside = [n for n in chosen if not n.startswith(prefix + ".")]
    if outside:
        log.warning("%s: %d chosen linear(s) outside the decoder blocks are left dense: %s",
                    type(cfg).__name__, len(outside), ", ".join(outside[:3]))
    dev = next(model.parameters()).device
    state = None
    if state_dir is not None:
        from ..calibration.resume import BlockState, run_fingerprint

        state = BlockState(state_dir, run_fingerprint(model, calib, cfg, tuple(chosen), fingerprint_extra))
    inputs = capture_first_inputs(model, blocks, calib.batches(batch_size))
    if state is not None and state.done:
        log.info("%s: resuming after block %d/%d from %s", type(cfg).__name__, state.done, len(blocks), state.dir)
        for b in range(state.done):
            for n, new in state.load_block(b).items():
                old = model.get_submodule(f"{prefix}.{b}.{n}")
                set_submodule(model, f"{prefix}.{b}.{n}", new.to(dev))
                if on_module is not None:
                    on_module(f"{prefix}.{b}.{n}", old, new)
        inputs.hidden = state.load_inputs()
    inputs.hidden = store_from(inputs.hidden, offload_dir)
    try:
        _blocks(model, cfg, blocks, prefix, chosen, inputs, dev, state, on_module, on_block, install)
    finally:
        inputs.hidden.close()
    return model


def _blocks(model, cfg, blocks, prefix, chosen, inputs, dev, state, on_module, on_block, install):
    for b, block in enumerate(blocks):
        if state is not None and b < state.done:
            continue
        bprefix = f"{prefix}.{b}."
        linears = {n[len(bprefix):]: m for n, m in chosen.items() if n.startswith(bprefix)}
        if linears:
            shared = _linear_groups(block, linears, inputs, dev)
            reps = [sub[0] for sub in shared]
            hooks = _HessianHooks({r: linears[r] for r in reps})
            accumulate_hessians(block, inputs, hooks, dev)
            for sub in shared:
                hsum, tokens = hooks.h[sub[0]], hooks.tokens[sub[0]]
                for n in sub:
                    lin = linears[n]
                    w = lin.weight.detach().float().cpu()
                    keep, new_w = _prune_one(cfg, w, hsum, tokens, f"{bprefix}{n}.weight")
                    install(model, bprefix + n, lin, keep, weight=new_w, nm=cfg.nm, on_module=on_module)
                del hooks.h[sub[0]]
        for i in range(len(inputs.hidden)):
            inputs.hidden[i] = _run_block(block, inputs, i, dev).detach().cpu()
        if state is not None:
            state.save_block(b, {n: block.get_submodule(n) for n in linears}, inputs.hidden)
        log.info("%s: block %d/%d done (%d linears)", type(cfg).__name__, b + 1, len(blocks), len(linears))
        if on_block is not None:
            on_block(b, len(blocks))
