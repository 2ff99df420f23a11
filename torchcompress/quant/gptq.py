"""GPTQ of a decoder model's linears, one block at a time on the block pipeline.

For each decoder block (:func:`gptq_block`): with ``true_sequential``, per group of linears in
execution order (q/k/v, then o, then gate/up, then down) the Hessians ``2 X^T X / T`` of the
group's inputs are collected over the real calibration tokens (summed across processes), each linear
is GPTQ-quantized and swapped in, and the next group is calibrated on the outputs of the already
quantized ones. Linears reading the same tensor share one Hessian. The solve runs on the device the
block is on (the fused Triton block kernel on CUDA); Hessians and updates stay float32/64 per layer.

Example::

    gptq_model(model, GPTQConfig(QuantScheme(bits=4, group_size=128)), calib)
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..config import GPTQConfig
from ..errors import ConfigError
from ..ignore import DEFAULT_IGNORE
from ..nn.gptq_linear import module_from_gptq
from ..nn.pruned_linear import PrunedLinear
from ..pipeline.context import BlockContext
from ..pipeline.engine import BlockStep, run_in_memory
from ..pipeline.skeleton import find_blocks
from ..pipeline.experts import routed_owners, unfuse_experts_
from ..primitives.gptq import gptq_quantize, layer_error, rtn_result
from ..targets import select_modules, set_submodule

log = logging.getLogger(__name__)

Callback = Callable[[str, nn.Module, nn.Module], None]


def gptq_linears(block: nn.Module, prefix: str, targets, ignore) -> dict[str, nn.Module]:
    """The block's linears a GPTQ stage quantizes (plain or pruned: masks are kept), by name in the block."""
    from ..pipeline.view import block_view

    view = block_view(prefix, block)
    return {n[len(prefix):]: m for n, m in select_modules(view, targets, ignore) if type(m) in (nn.Linear, PrunedLinear)}


@torch.no_grad()
def gptq_block(ctx: BlockContext, cfg: GPTQConfig, linears: dict[str, nn.Module], *, on_module: Callback | None = None,
               on_loss: Callable[[str, float], None] | None = None) -> None:
    """GPTQ-quantize ``linears`` (name in the block -> module) of ``ctx.block`` in place."""
    if not linears:
        return
    shared = ctx.linear_groups(linears)
    rep_of = {n: sub[0] for sub in shared for n in sub}
    groups = shared if cfg.true_sequential else [[n for sub in shared for n in sub]]
    experts = routed_owners(ctx.block)  # expert linears: calibrated only on the tokens routed to them
    hess: dict = {}
    for group in groups:
        reps = [sub[0] for sub in shared if sub[0] in group]
        hess.clear()  # the previous group's Hessians go before this group's are collected
        last = next(sub[0] for sub in reversed(shared) if sub[0] in group) if cfg.true_sequential else None
        stats = ctx.collect({n: linears[n] for n in reps}, "hessian", stop_after=last)
        tokens = {r: stats[r].tokens for r in reps}
        hess.update({r: stats.pop(r).hessian() for r in reps})
        for n in group:
            lin, full = linears[n], ctx.prefix + n
            w = lin.weight.detach()
            mask = lin.mask if isinstance(lin, PrunedLinear) else None
            need = cfg.expert_min_tokens * lin.in_features
            if id(lin) in experts and tokens[rep_of[n]] < need:
                log.warning("%s: %d calibration tokens routed to this expert (< %g x %d in-features); "
                            "round-to-nearest instead of GPTQ", full, tokens[rep_of[n]], cfg.expert_min_tokens,
                            lin.in_features)
                res = rtn_result(w, cfg.scheme, mse=cfg.mse, mask=mask, act_order=cfg.act_order,
                                 static_groups=cfg.static_groups)
                reason = f"{tokens[rep_of[n]]} routed tokens < {need:g}"
            else:
                res = gptq_quantize(w, hess[rep_of[n]].to(w.device), cfg.scheme, block_size=cfg.block_size,
                                    damp=cfg.damp, act_order=cfg.act_order, static_groups=cfg.static_groups,
                                    mse=cfg.mse, name=f"{full}.weight", mask=mask)
                reason = "Hessian not positive definite"
                if res.fallback:
                    log.warning("%s: Hessian not positive definite even with 1000x damping; fell back to "
                                "round-to-nearest", full)
            new = module_from_gptq(lin, res, cfg.scheme, cfg).to(w.device)
            if res.fallback:
                new.gptq_info["fallback_reason"] = reason
            set_submodule(ctx.block, n, new)
            if on_loss is not None:
                h = hess[rep_of[n]]
                on_loss(full, layer_error(new.dequantize(torch.float32).to(h.device), w.float().to(h.device), h))
            if on_module is not None:
                on_module(full, lin, new)


def gptq_step(cfg: GPTQConfig, targets, ignore, *, on_module: Callback | None = None, on_loss=None) -> BlockStep:
    """GPTQ as a step of the block pipeline."""
    def apply(ctx: BlockContext) -> None:
        gptq_block(ctx, cfg, gptq_linears(ctx.block, ctx.prefix, targets, ignore), on_module=on_module, on_loss=on_loss)

    return BlockStep(apply, needs_forward=True, name="gptq")


@torch.no_grad()
def gptq_model(model: nn.Module, cfg: GPTQConfig, calib, *, targets: Iterable = (nn.Linear,),
               ignore: Iterable | None = None, batch_size: int = 8, on_module: Callback | None = None,
               on_block: Callable[[int, int], None] | None = None, on_loss: Callable[[str, float], None] | None = None,
               state_dir=None, offload_dir=None) -> nn.Module:
    """GPTQ-quantize the decoder blocks' linears of ``model`` (in memory) in place with ``calib``.

    With ``state_dir`` every finished block is recorded there and a later call with the same model,
    data and config continues after the last finished block, bit-identically. ``on_loss(name, loss)``
    gets each layer's output error ``trace((W - W_hat) H (W - W_hat)^T)`` just before ``on_module``.
    With ``offload_dir`` block inputs live on disk (one batch in memory at a time); same result.
    """
    if calib is None:
        raise ConfigError("calib_data", "GPTQ needs calibration data: pass a CalibrationSet "
                          "(torchcompress.calibration.build_calibration) or use the CLI's --calib")
    ignore = DEFAULT_IGNORE if ignore is None else ignore
    unfuse_experts_(model)  # one nn.Linear per MoE expert projection (transformers 5 fuses them)
    prefix, blocks = find_blocks(model)
    state = None
    if state_dir is not None:
        from ..calibration.resume import BlockState, run_fingerprint

        state = BlockState(state_dir, run_fingerprint(model, calib, cfg, targets, ignore))

    def restore(b, modules):
        for n, new in modules.items():
            full = f"{prefix}.{b}.{n}"
            old = model.get_submodule(full)
            set_submodule(model, full, new.to(old.weight.device if getattr(old, "weight", None) is not None else "cpu"))
            if on_module is not None:
                on_module(full, old, new)

    run_in_memory(model, [gptq_step(cfg, targets, ignore, on_module=on_module, on_loss=on_loss)], calib,
                  batch_size=batch_size, state=state, offload_dir=offload_dir, on_block=on_block, restore=restore)
    return model
