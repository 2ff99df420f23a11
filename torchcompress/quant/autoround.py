"""Sign-gradient rounding (AutoRound's SignRound) of a decoder model's linears, block by block.

For each decoder block (:func:`autoround_block`): the float block's outputs on the calibration
activations entering it are the targets; every target linear is swapped for a fake-quantized copy
whose rounding offsets and clip factors (``primitives/signround.py``) are learned together, for all
linears of the block at once, by ``iters`` signed-gradient steps on the masked mean squared error
between the block's output and the target, each step on a random mini-batch (seeded). The
parameters of the lowest step loss are kept (step 0 is round-to-nearest, so the kept loss is never
above RTN's on its batch); the linears are then packed into ``QuantLinear`` with exactly the codes
the fake quantizer used. The pipeline then runs the calibration activations through the quantized
block: the next block is tuned on the quantized model's activations (as GPTQ is), with the float
block's outputs on those same activations as its targets.

Example::

    autoround_model(model, AutoRoundConfig(QuantScheme(bits=4, group_size=128, symmetric=False)), calib)
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..ignore import DEFAULT_IGNORE
from ..nn.quant_linear import QuantLinear
from ..pipeline.context import BlockContext, to_device
from ..pipeline.engine import BlockStep, run_in_memory
from ..primitives.signround import SignRoundParams, SignSGD, fake_quant, init_params, quantize_signround
from ..targets import select_modules, set_submodule
from .autoround_config import AutoRoundConfig

log = logging.getLogger(__name__)

Callback = Callable[[str, nn.Module, nn.Module], None]


class _FakeQuantLinear(nn.Module):
    """A linear whose forward uses the fake-quantized weight under learnable SignRound parameters."""

    def __init__(self, lin: nn.Linear, cfg: AutoRoundConfig):
        super().__init__()
        self.orig, self.scheme = lin, cfg.scheme
        self.w = lin.weight.detach().float()  # (N, K) the float master, never updated
        self.p: SignRoundParams = init_params(self.w, cfg.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        w_hat = fake_quant(self.w, self.p, self.scheme).to(x.dtype)
        b = self.orig.bias
        return F.linear(x, w_hat, None if b is None else b.detach())


def autoround_linears(block: nn.Module, prefix: str, targets, ignore) -> dict[str, nn.Linear]:
    """The block's plain linears the stage quantizes, by name in the block."""
    from ..pipeline.view import block_view

    view = block_view(prefix, block)
    return {n[len(prefix):]: m for n, m in select_modules(view, targets, ignore) if type(m) is nn.Linear}


def take_rows(obj, idx: torch.Tensor, rows: int):
    """``obj`` (a batch's hidden states, keyword arguments) restricted to the samples ``idx``: every
    tensor of 2 or more dims whose first dim is the batch is indexed; broadcast ones (1, ...) are kept."""
    if torch.is_tensor(obj):
        if rows > 1 and obj.dim() >= 2 and obj.shape[0] == rows:
            return obj.index_select(0, idx.to(obj.device))
        return obj
    if isinstance(obj, tuple):
        return tuple(take_rows(o, idx, rows) for o in obj)
    if isinstance(obj, list):
        return [take_rows(o, idx, rows) for o in obj]
    if isinstance(obj, dict):
        return {k: take_rows(v, idx, rows) for k, v in obj.items()}
    return obj


def _masked_mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    d = out.float() - target.float()  # (B, L, D)
    return d[mask.to(d.device)].pow(2).mean()  # over real tokens and features


def autoround_block(ctx: BlockContext, cfg: AutoRoundConfig, linears: dict[str, nn.Linear], *,
                    on_module: Callback | None = None, on_block_loss: Callable[[str, float, float], None] | None = None
                    ) -> None:
    """Learn SignRound parameters for ``linears`` of ``ctx.block`` on its output error, then pack them."""
    if not linears:
        return
    inputs, dev = ctx.inputs, ctx.device
    with torch.no_grad():
        targets = ctx.outputs()  # the float block's outputs, per captured batch (B, L, D)
    fq = {n: _FakeQuantLinear(lin, cfg) for n, lin in linears.items()}
    for n, m in fq.items():
        set_submodule(ctx.block, n, m)
    params = [t for m in fq.values() for t in m.p.tensors()]
    bounds = [b for m in fq.values() for b in m.p.bounds()]
    opt = SignSGD(params, bounds, cfg.step_lr, cfg.iters)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + ctx.index)
    best, best_loss, first_loss = {n: m.p.clone() for n, m in fq.items()}, float("inf"), None
    try:
        for t in range(cfg.iters):
            i = int(torch.randint(len(inputs), (1,), generator=gen))
            rows = inputs.hidden[i].shape[0]
            idx = torch.arange(rows)
            if cfg.batch_size < rows:
                idx = torch.randperm(rows, generator=gen)[: cfg.batch_size].sort().values
            x = take_rows(inputs.hidden[i], idx, rows).to(dev)
            kw = to_device(take_rows(inputs.kwargs_for(ctx.index, i), idx, rows), dev)
            mask = take_rows(inputs.masks[i], idx, rows).bool()
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                out = ctx.block(x, **kw)
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = _masked_mse(out, take_rows(targets[i], idx, rows), mask)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            value = float(loss)
            if first_loss is None:
                first_loss = value
            if value < best_loss:  # the parameters this loss was measured with, before the step
                best_loss, best = value, {n: m.p.clone() for n, m in fq.items()}
            opt.step(grads)
    finally:
        for p in params:
            p.requires_grad_(False)
        for n, lin in linears.items():
            set_submodule(ctx.block, n, lin)
    if first_loss is not None:
        log.info("%s: sign-gradient rounding, loss %.4g (round-to-nearest) -> %.4g (kept) over %d steps",
                 ctx.prefix.rstrip("."), first_loss, best_loss, cfg.iters)
        if on_block_loss is not None:
            on_block_loss(ctx.prefix.rstrip("."), first_loss, best_loss)
    with torch.no_grad():
        for n, lin in linears.items():
            full = ctx.prefix + n
            w = lin.weight.detach()
            q = quantize_signround(w.float(), best[n], cfg.scheme, name=f"{full}.weight")
            new = QuantLinear.from_quantized(lin, cfg.scheme, q).to(w.device)
            set_submodule(ctx.block, n, new)
            if on_module is not None:
                on_module(full, lin, new)


def autoround_step(cfg: AutoRoundConfig, targets, ignore, *, on_module: Callback | None = None,
                   on_block_loss=None) -> BlockStep:
    """Sign-gradient rounding as a step of the block pipeline (reads calibration activations)."""
    def apply(ctx: BlockContext) -> None:
        autoround_block(ctx, cfg, autoround_linears(ctx.block, ctx.prefix, targets, ignore), on_module=on_module,
                        on_block_loss=on_block_loss)

    return BlockStep(apply, needs_forward=True, name="autoround")


def autoround_model(model: nn.Module, cfg: AutoRoundConfig, calib, *, targets: Iterable = (nn.Linear,),
                    ignore: Iterable | None = None, batch_size: int = 8, on_module: Callback | None = None,
                    on_block: Callable[[int, int], None] | None = None, on_block_loss=None,
                    offload_dir=None) -> nn.Module:
    """Quantize the decoder blocks' linears of ``model`` (in memory, in place) by sign-gradient rounding.

    ``batch_size``: samples per captured calibration batch (the pipeline's); each step draws
    ``cfg.batch_size`` of one batch's samples. ``on_block_loss(block, rtn_loss, kept_loss)`` per block.
    """
    if calib is None:
        raise ConfigError("calib_data", "sign-gradient rounding needs calibration data: pass a CalibrationSet "
                          "(torchcompress.calibration.build_calibration) or use the CLI's --calib")
    ignore = DEFAULT_IGNORE if ignore is None else ignore
    run_in_memory(model, [autoround_step(cfg, targets, ignore, on_module=on_module, on_block_loss=on_block_loss)],
                  calib, batch_size=batch_size, offload_dir=offload_dir, on_block=on_block)
    return model
