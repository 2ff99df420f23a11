"""Layer-by-layer GPTQ for transformers decoder models.

1. Run the model on the calibration ids until the first decoder block and keep that block's
   inputs (hidden states + the keyword arguments the model passes: masks, rotary embeddings).
2. For each block: register removable forward hooks on its linears that accumulate ``X^T X`` over
   the real (unmasked) tokens, run the block, GPTQ-quantize the linears, swap in the quantized
   modules. With ``true_sequential`` this happens per group of linears in execution order
   (q/k/v, then o, then gate/up, then down), each group calibrated on the outputs of the already
   quantized ones. Finally re-run the block with its quantized weights: its outputs are the next
   block's inputs.

Only the current block's activations are held (on CPU between blocks, one batch at a time on the
model's device). Under ``torch.distributed`` each rank holds a shard of the calibration samples and
the Hessians are summed across ranks before quantizing, so every rank computes the same weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..config import GPTQConfig
from ..errors import ConfigError, InputError
from ..nn.gptq_linear import module_from_gptq
from ..primitives.gptq import gptq_quantize, layer_error
from ..targets import select_modules

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    hidden: list  # per batch: (B, L, D) on CPU
    kwargs: list  # per batch: the keyword arguments of the block call (CPU)
    masks: list  # per batch: (B, L) attention mask, 1 on real tokens


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers`` and the like)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and (n is None or len(m) == n) and name.endswith("layers"):
            return m
    raise InputError(f"{type(model).__name__}: no decoder layer list found; layer-by-layer calibration needs a "
                     "transformers decoder model")


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_first_inputs(model: nn.Module, blocks: nn.ModuleList, batches) -> BlockInputs:
    dev = next(model.parameters()).device
    got = BlockInputs([], [], [])

    def hook(_mod, args, kwargs):
        kw = dict(kwargs)
        hidden = args[0] if args else kw.pop("hidden_states")
        kw.pop("past_key_values", None)
        kw["use_cache"] = False
        got.hidden.append(hidden.detach().cpu())
        got.kwargs.append(_to(kw, "cpu"))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids, mask in batches:
            got.masks.append(mask.cpu())
            try:
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return got


def _run_block(block: nn.Module, inputs: BlockInputs, i: int, dev) -> torch.Tensor:
    out = block(_to(inputs.hidden[i], dev), **_to(inputs.kwargs[i], dev))
    return out[0] if isinstance(out, (tuple, list)) else out


class _HessianHooks:
    """Removable hooks that sum ``x^T x`` (float64) over real tokens for each named linear."""

    def __init__(self, named: dict[str, nn.Linear], stop_after: str | None = None):
        self.h = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in named.items()}
        self.tokens = {n: 0 for n in named}
        self.mask = None  # (B, L) bool for the current batch
        self.handles = [m.register_forward_hook(self._hook(n, n == stop_after)) for n, m in named.items()]

    def _hook(self, name, stop):
        def fn(_mod, args, _out):
            x = args[0].detach()  # (B, L, K)
            x = x[self.mask.to(x.device)] if self.mask is not None else x.reshape(-1, x.shape[-1])  # (T, K)
            xf = x.float()
            self.h[name] += (xf.T @ xf).cpu().double()  # float32 product per batch, float64 running sum
            self.tokens[name] += x.shape[0]
            if stop:
                raise _Stop  # the rest of the block is not needed for these Hessians
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()

    def finalize(self, name: str) -> torch.Tensor:
        """``H = 2 X X^T / T``, summed over ranks when torch.distributed is initialized."""
        h, t = self.h[name], torch.tensor([float(self.tokens[name])], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(h)
            torch.distributed.all_reduce(t)
        return h * (2.0 / max(float(t), 1.0))


def accumulate_hessians(block: nn.Module, inputs: BlockInputs, hooks: _HessianHooks, dev) -> None:
    """Run every calibration batch through ``block`` so ``hooks`` sum their Hessians; removes the hooks."""
    try:
        for i in range(len(inputs.hidden)):
            hooks.mask = inputs.masks[i].bool()
            try:
                _run_block(block, inputs, i, dev)
            except _Stop:
                pass  # the hooks stopped the block after the last linear they need
    finally:
        hooks.remove()


def _linear_groups(block: nn.Module, linears: dict[str, nn.Linear], inputs: BlockInputs, dev) -> list[list[str]]:
    """Linears in execution order, grouped by shared input (q/k/v read the same tensor)."""
    order, seen, alive = [], {}, []

    def hook(name):
        def fn(_mod, args, _out):
            alive.append(args[0])  # keep it alive so no later tensor reuses its address
            key = (args[0].data_ptr(), tuple(args[0].shape))
            if key in seen:
                order[seen[key]].append(name)
            else:
                seen[key] = len(order)
                order.append([name])
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        _run_block(block, inputs, 0, dev)  # the first batch
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in linears if not any(n in g for g in order)]
    return order + ([missing] if missing else [])


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    cfg: GPTQConfig,
    calib,
    *,
    targets: Iterable = (nn.Linear,),
    ignore: Iterable | None = None,
    batch_size: int = 8,
    on_module: Callable[[str, nn.Module, nn.Module], None] | None = None,
    on_block: Callable[[int, int], None] | None = None,
    on_loss: Callable[[str, float], None] | None = None,
    state_dir=None,
    offload_dir=None,
) -> nn.Module:
    """GPTQ-quantize the decoder blocks' linears of ``model`` in place with ``calib`` (a CalibrationSet).

    With ``state_dir``, every finished block is recorded there (:mod:`.resume`) and a later call with
    the same model, data and config continues after the last finished block, bit-identically.
    ``on_loss(name, loss)`` gets each layer's output error on the calibration data,
    ``trace((W - W_hat) H (W - W_hat)^T)``, just before ``on_module`` for that layer.
    With ``offload_dir``, the block inputs of all calibration batches are kept on disk there (one
    batch in memory at a time; :mod:`.offload`) instead of in CPU memory; the result is identical.
    """
    from .offload import store_from

    from ..api import DEFAULT_IGNORE
    from ..targets import set_submodule

    if calib is None:
        raise ConfigError("calib_data", "GPTQ needs calibration data: pass a CalibrationSet "
                          "(torchcompress.calibration.build_calibration) or use the CLI's --calib")
    ignore = DEFAULT_IGNORE if ignore is None else ignore
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    from ..nn.pruned_linear import PrunedLinear

    # pruned layers too: their masks are kept through quantization (gptq_quantize's ``mask``)
    chosen = {n: m for n, m in select_modules(model, targets, ignore) if type(m) in (nn.Linear, PrunedLinear)}
    dev = next(model.parameters()).device
    state = None
    if state_dir is not None:
        from .resume import BlockState, run_fingerprint

        state = BlockState(state_dir, run_fingerprint(model, calib, cfg, targets, ignore))
    inputs = capture_first_inputs(model, blocks, calib.batches(batch_size))
    if state is not None and state.done:
        log.info("gptq: resuming after block %d/%d from %s", state.done, len(blocks), state.dir)
        for b in range(state.done):
            for n, new in state.load_block(b).items():
                old = model.get_submodule(f"{prefix}.{b}.{n}")
                set_submodule(model, f"{prefix}.{b}.{n}", new.to(dev))
                if on_module is not None:
                    on_module(f"{prefix}.{b}.{n}", old, new)
        inputs.hidden = state.load_inputs()
    inputs.hidden = store_from(inputs.hidden, offload_dir)
    try:
        for b, block in enumerate(blocks):
            bprefix = f"{prefix}.{b}."
            if state is not None and b < state.done:
                for n in [n for n in chosen if n.startswith(bprefix)]:
                    del chosen[n]  # restored from the state above: let the float originals go
                continue
            # taken out of ``chosen``: once replaced, a block's float linears are freed with the block
            linears = {n[len(bprefix):]: chosen.pop(n) for n in [n for n in chosen if n.startswith(bprefix)]}
            if linears:
                shared = _linear_groups(block, linears, inputs, dev)
                rep_of = {n: sub[0] for sub in shared for n in sub}
                groups = shared if cfg.true_sequential else [[n for sub in shared for n in sub]]
                last_of = lambda group: next(sub[0] for sub in reversed(shared) if sub[0] in group)  # noqa: E731
                for group in groups:
                    # linears reading the same input (q/k/v, gate/up) share one Hessian
                    reps = [sub[0] for sub in shared if sub[0] in group]
                    hooks = _HessianHooks({n: linears[n] for n in reps}, stop_after=last_of(group) if cfg.true_sequential else None)
                    accumulate_hessians(block, inputs, hooks, dev)
                    hess = {r: hooks.finalize(r) for r in reps}
                    for n in group:
                        lin = linears[n]
                        res = gptq_quantize(lin.weight.detach().cpu(), hess[rep_of[n]], cfg.scheme,
                                            block_size=cfg.block_size, damp=cfg.damp, act_order=cfg.act_order,
                                            static_groups=cfg.static_groups, mse=cfg.mse, name=f"{bprefix}{n}.weight",
                                            mask=lin.mask.cpu() if isinstance(lin, PrunedLinear) else None)
                        if res.fallback:
                            log.warning("%s%s: Hessian not positive definite even with 1000x damping; "
                                        "fell back to round-to-nearest", bprefix, n)
                        new = module_from_gptq(lin, res, cfg.scheme, cfg).to(dev)
                        set_submodule(model, bprefix + n, new)
                        if on_loss is not None:
                            on_loss(bprefix + n, layer_error(new.dequantize(torch.float32).cpu(),
                                                             lin.weight.detach().float().cpu(), hess[rep_of[n]]))
                        if on_module is not None:
                            on_module(bprefix + n, lin, new)
            # the next block's inputs: this block's outputs with its quantized weights
            for i in range(len(inputs.hidden)):
                inputs.hidden[i] = _run_block(block, inputs, i, dev).detach().cpu()
            if state is not None:
                state.save_block(b, {n: block.get_submodule(n) for n in linears}, inputs.hidden)
            log.info("gptq: block %d/%d done (%d linears)", b + 1, len(blocks), len(linears))
            if on_block is not None:
                on_block(b, len(blocks))
    finally:
        inputs.hidden.close()
    return model
