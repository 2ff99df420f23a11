"""AWQ on one decoder block, and the stage that runs it on the block pipeline.

Per block, for each group of linears that read one tensor (:data:`LLAMA_GROUPS`): one pass over the
calibration batches collects mean |x| per channel of the group's input (and ``sum x x^T`` for the
clip search or a one-linear group) and, for a multi-linear group, the inputs and float output of the
submodule the loss looks at (``self_attn`` for q/k/v, ``mlp`` for gate/up). The grid of
:func:`~torchcompress.primitives.awq.alpha_grid` is searched for the scales whose ``Q(W * s)`` applied
to ``X / s`` gives the submodule output closest (mean squared error over real tokens) to the float
one; a one-linear group (o_proj, down_proj) gets that error from ``sum x x^T`` without re-running
the tokens. The winner is folded: columns ``* s``, the producer's outputs ``/ s`` (an RMSNorm's weight,
or v_proj's / up_proj's rows; with grouped-query attention one scale per kv channel, shared by the
query heads that read it), so the float function is unchanged. Then the optional clip search.

A group whose producer is missing, is not a norm that scales with its weight, or whose shapes do not
line up is skipped and reported (:class:`GroupResult` ``skipped``), never folded halfway.

Example::

    awq_model(model, AWQConfig(), calib)       # float weights rescaled + clipped; then quantize_ / GPTQ
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..pipeline.context import BlockContext, StopForward
from ..pipeline.engine import BlockStep
from ..pipeline.stats import Statistic
from ..primitives.awq import (alpha_grid, awq_scales, clip_search, hessian_output_error, scaled_weight, searched_weight,
                              weight_mean)
from .awq_config import AWQConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupSpec:
    prev: str  # the module whose outputs the linears read (a norm, or a linear), name in the block
    linears: tuple[str, ...]
    inspect: str  # the submodule whose output the search compares (the linear itself for one-linear groups)


LLAMA_GROUPS = (
    GroupSpec("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    GroupSpec("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    GroupSpec("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    GroupSpec("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
NO_CLIP = ("q_proj", "k_proj")  # AutoAWQ: their outputs meet in the attention scores; their own MSE misleads


@dataclass
class GroupResult:
    prev: str  # full name of the producer
    linears: tuple[str, ...]
    alpha: float | None = None  # None: s = 1 won (plain rounding)
    loss_rtn: float | None = None  # mean squared output error, s = 1
    loss: float | None = None  # ... with the chosen scales (before clipping)
    clipped: int = 0  # (row, group) ranges shrunk by the clip search
    skipped: str | None = None  # why the group was left alone
    params: int = 0  # weights of the group's linears (rescaled in place: same bytes)
    bytes: int = 0

    def describe(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        a = "s=1" if self.alpha is None else f"alpha={self.alpha:.3f}"
        return f"{a}, output mse {self.loss_rtn:.4g} (rtn) -> {self.loss:.4g}, {self.clipped} ranges clipped"


def _out_div(mod: nn.Module, s: torch.Tensor) -> None:
    """Divide a norm's or a linear's outputs by ``s`` (weight (K,) or rows of (K, *), and bias)."""
    w = mod.weight.data
    mod.weight.data = (w.float() / (s if w.ndim == 1 else s[:, None])).to(w.dtype)
    if getattr(mod, "bias", None) is not None:
        mod.bias.data = (mod.bias.data.float() / s).to(mod.bias.dtype)


@torch.no_grad()
def _scales_with_weight(norm: nn.Module, k: int) -> bool:
    """Does ``norm(x)`` with weight / s equal ``norm(x) / s``? (False for a ``1 + weight`` RMSNorm.)"""
    g = torch.Generator().manual_seed(0)
    dev, dt = norm.weight.device, norm.weight.dtype
    probe = torch.randn(4, k, generator=g).to(dev, dt)
    s = (torch.rand(k, generator=g) + 0.5).to(dev)
    saved = [norm.weight.data.clone(), None if getattr(norm, "bias", None) is None else norm.bias.data.clone()]
    try:
        before = norm(probe).float()
        _out_div(norm, s)
        after = norm(probe).float()
    finally:
        norm.weight.data = saved[0]
        if saved[1] is not None:
            norm.bias.data = saved[1]
    return bool(torch.allclose(after, before / s, rtol=1e-3, atol=1e-5 * float(before.abs().max()) + 1e-30))


def _resolve(block: nn.Module, spec: GroupSpec):
    """(producer, linears, inspected module, kv view or None), or the reason the group is skipped."""
    try:
        prev = block.get_submodule(spec.prev)
        lins = [block.get_submodule(n) for n in spec.linears]
        inspect = block.get_submodule(spec.inspect)
    except AttributeError as e:
        return f"{type(block).__name__} has no {str(e).split()[-1]} (Llama-style names expected)"
    if not all(type(m) is nn.Linear for m in lins):
        return "not every linear of the group is a float nn.Linear (already compressed?)"
    k = lins[0].in_features
    if any(m.in_features != k for m in lins):
        return "the group's linears differ in input width"
    w = getattr(prev, "weight", None)
    if not isinstance(w, torch.Tensor):
        return f"{spec.prev} has no weight to fold the scales into"
    if type(prev) is not nn.Linear:  # a norm
        if w.ndim != 1 or w.numel() != k:
            return f"{spec.prev} (weight {tuple(w.shape)}) is not a norm over the group's {k} inputs"
        if not _scales_with_weight(prev, k):
            return f"{spec.prev}: the norm's output does not scale with its weight (e.g. a 1 + weight RMSNorm)"
        return prev, lins, inspect, None
    kv = prev.out_features
    if kv == k:
        return prev, lins, inspect, None
    attn = block.get_submodule(spec.prev.rpartition(".")[0]) if "." in spec.prev else block
    hd = int(getattr(attn, "head_dim", 0) or 0)
    if k % kv or hd <= 0 or kv % hd:  # not grouped-query attention (v's kv channels read by k // kv query heads)
        return f"{spec.prev} has {kv} outputs for {k} inputs of {spec.linears[0]} and no grouped-query layout"
    return prev, lins, inspect, (kv // hd, k // kv, hd)


def _real(t: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """(B, L, D) -> (T, D) real tokens (mask (B, L)), or all rows where the mask does not fit."""
    if m is not None and tuple(m.shape) == tuple(t.shape[:-1]):
        return t[m.to(t.device)]
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def _observe(ctx: BlockContext, lin: nn.Module, inspect: nn.Module | None, hessian: bool):
    """One pass up to the group's output: mean |x| (and ``sum x x^T``) of ``lin``'s input; with
    ``inspect``, its per-batch call arguments and float outputs."""
    k = lin.in_features
    xs = Statistic("absmean", k, ctx.device)
    hs = Statistic("hessian", k, ctx.device) if hessian else None
    calls, outs, mask = [], [], [None]

    def on_lin(_m, args, _out):
        x = _real(args[0].detach(), mask[0])
        xs.add(x)
        if hs is not None:
            hs.add(x)
        if inspect is None:
            raise StopForward

    def on_pre(_m, args, kwargs):
        calls.append((args, kwargs))

    def on_out(_m, _args, _kwargs, out):
        outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
        raise StopForward

    handles = [lin.register_forward_hook(on_lin)]
    if inspect is not None:
        handles += [inspect.register_forward_pre_hook(on_pre, with_kwargs=True),
                    inspect.register_forward_hook(on_out, with_kwargs=True)]
    masks = []
    try:
        for i in range(len(ctx.inputs)):
            mask[0] = ctx.inputs.masks[i].bool()
            masks.append(mask[0])
            try:
                ctx.forward(i)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return xs.all_reduce(), (hs.all_reduce() if hs is not None else None), calls, outs, masks


def _module_sse(inspect: nn.Module, calls, refs, masks) -> tuple[float, int]:
    """Sum of squared differences of ``inspect``'s outputs from ``refs`` over real tokens, and their count."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for (args, kwargs), ref, m in zip(calls, refs, masks):
        out = inspect(*args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        d = _real(out.float() - ref.float(), m)
        total += d.square().sum(dtype=torch.float64).cpu()
        count += d.numel()
    return float(total), count


def _kv(v: torch.Tensor, view) -> torch.Tensor:
    return v if view is None else v.view(view).mean(dim=1).flatten()


def _expand(s: torch.Tensor, view) -> torch.Tensor:
    return s if view is None else s.view(view[0], 1, view[2]).expand(view).flatten()


def _allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        d.all_reduce(t)
    return t


# relative change of the block's output a fold may cause (rounding of the rescaled weights): fp32 logits
# move ~7e-7 on the tiny test model (tests/quant/test_awq.py); a wrong producer measured 3e-2 there
_FOLD_TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def _rel_change(ctx: BlockContext, ref: torch.Tensor) -> float:
    out = ctx.forward(0).float()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


@torch.no_grad()
def awq_group(ctx: BlockContext, spec: GroupSpec, cfg: AWQConfig) -> GroupResult:
    """Search, fold and clip one group of ``ctx.block`` in place. A fold that changes the block's output
    on batch 0 beyond rounding is undone and the group skipped (the block is not wired as assumed)."""
    res = GroupResult(ctx.prefix + spec.prev, tuple(ctx.prefix + n for n in spec.linears))
    r = _resolve(ctx.block, spec)
    if isinstance(r, str):
        res.skipped = r
        log.warning("AWQ %s -> %s skipped: %s", res.prev, ", ".join(spec.linears), r)
        return res
    prev, lins, inspect, view = r
    res.params = sum(m.weight.numel() for m in lins)
    res.bytes = sum(m.weight.numel() * m.weight.element_size() for m in lins)
    single = len(lins) == 1 and inspect is lins[0]
    xs, hs, calls, outs, masks = _observe(ctx, lins[0], None if single else inspect, single or cfg.clip)
    if xs.tokens == 0:
        res.skipped = "no calibration token reached the group"
        return res
    x_mean = _kv(xs.mean(), view)
    w_mean = _kv(weight_mean([m.weight for m in lins], cfg.scheme).to(x_mean.device), view)
    h = hs.sum if hs is not None else None
    orig = [m.weight.data.clone() for m in lins]
    grid = alpha_grid(cfg.grid)
    sse, count = [], 0
    try:
        for a in grid:
            s = _expand(awq_scales(x_mean, w_mean, a), view).to(orig[0].device)
            if single:  # sum_t ||dW x_t||^2 from sum x x^T: no second pass over the tokens
                sse.append(hessian_output_error(searched_weight(orig[0], s, cfg.scheme).float() - orig[0].float(), h))
                count = hs.tokens * lins[0].out_features
            else:
                for m, w in zip(lins, orig):
                    m.weight.data = searched_weight(w, s, cfg.scheme)
                e, count = _module_sse(inspect, calls, outs, masks)
                sse.append(e)
    finally:
        for m, w in zip(lins, orig):
            m.weight.data = w
    del calls, outs
    losses = torch.tensor(sse + [float(count)], dtype=torch.float64)
    if not single:  # the module path sums this rank's tokens only (the Hessian is already summed)
        losses = _allreduce_sum(losses)
    losses, count = losses[:-1], float(losses[-1])
    losses = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, float("inf")))
    if not bool(torch.isfinite(losses).any()):
        res.skipped = "every grid point gave a non-finite output error"
        log.warning("AWQ %s skipped: %s", res.prev, res.skipped)
        return res
    best = int(torch.argmin(losses))  # the first of equal minima, as the peers' strict '<'
    res.alpha, res.loss_rtn, res.loss = grid[best], float(losses[0]) / count, float(losses[best]) / count
    s = _expand(awq_scales(x_mean, w_mean, grid[best]), view).to(orig[0].device)
    ref = ctx.forward(0).float()  # after the earlier groups' folds and clips
    saved = [prev.weight.data.clone(), None if getattr(prev, "bias", None) is None else prev.bias.data.clone()]
    for m, w in zip(lins, orig):
        m.weight.data = scaled_weight(w, s)
    _out_div(prev, _kv_scales(s, view))
    # the fold must leave the block's float output alone: else the block is not wired as assumed
    err = _rel_change(ctx, ref)
    if err > _FOLD_TOL.get(orig[0].dtype, 1e-3):
        for m, w in zip(lins, orig):
            m.weight.data = w
        prev.weight.data = saved[0]
        if saved[1] is not None:
            prev.bias.data = saved[1]
        res.alpha = res.loss = None
        res.skipped = (f"folding the scales into {spec.prev} changed the block's float output by {err:.2e} "
                       "(relative): it does not feed these linears the way a Llama block does")
        log.warning("AWQ %s skipped: %s", res.prev, res.skipped)
        return res
    if cfg.clip:
        hs_ = (h.float() / (s[:, None] * s[None, :])).to(h.device)  # the inputs are x / s now
        for name, m in zip(spec.linears, lins):
            if name.rpartition(".")[2] in NO_CLIP:
                continue
            w, shrink = clip_search(m.weight.data, hs_, cfg.scheme, grid=cfg.clip_grid, max_shrink=cfg.max_shrink)
            m.weight.data = w
            res.clipped += int((shrink < 1).sum())
    return res


def _kv_scales(s: torch.Tensor, view) -> torch.Tensor:
    """The producer's scales: v_proj has one output per kv channel (the first of each query group)."""
    return s if view is None else s.view(view)[:, 0, :].flatten()


def awq_block(ctx: BlockContext, cfg: AWQConfig, groups=LLAMA_GROUPS) -> list[GroupResult]:
    """AWQ on every group of ``ctx.block``, in execution order (each group's pass sees the earlier folds,
    which leave its float inputs unchanged)."""
    return [awq_group(ctx, g, cfg) for g in groups]


def awq_step(cfg: AWQConfig, on_group: Callable[[GroupResult], None] | None = None) -> BlockStep:
    """AWQ as a step of the block pipeline. The next block gets this block's original outputs (as
    AutoAWQ does): the statistics are the float model's whatever stages follow in the block."""
    def apply(ctx: BlockContext) -> None:
        for r in awq_block(ctx, cfg):
            if on_group is not None:
                on_group(r)

    return BlockStep(apply, needs_forward=True, propagate_original=True, name="awq")


@torch.no_grad()
def awq_model(model: nn.Module, cfg: AWQConfig, calib, *, batch_size: int = 8,
              on_group: Callable[[GroupResult], None] | None = None, offload_dir=None) -> list[GroupResult]:
    """AWQ over every decoder block of an in-memory model, in place; returns what each group got."""
    from ..pipeline.engine import run_in_memory

    if calib is None:
        raise ConfigError("calib_data", "AWQ needs calibration data (activation statistics): pass a CalibrationSet "
                          "or use the CLI's --calib")
    got: list[GroupResult] = []

    def collect(r: GroupResult) -> None:
        got.append(r)
        if on_group is not None:
            on_group(r)

    run_in_memory(model, [awq_step(cfg, collect)], calib, batch_size=batch_size, offload_dir=offload_dir)
    return got


__all__ = ["AWQConfig", "GroupResult", "GroupSpec", "LLAMA_GROUPS", "awq_block", "awq_group", "awq_model", "awq_step"]
