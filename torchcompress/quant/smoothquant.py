"""SmoothQuant on one decoder block, and the stage that runs it on a whole in-memory model.

:func:`smooth_block` is the unit the block pipeline calls: a decoder block (Llama layout: ``input_layernorm``,
``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``) and the max |input|
per channel of its linears, keyed by their names inside the block. Four migrations, each exact in float:

* ``input_layernorm`` -> q, k, v (norm weight / s, their columns * s), statistic ``self_attn.q_proj``;
* v -> o: v's output rows / s, o's input columns * s (with grouped-query attention one s per kv
  channel, shared by the query heads that read it), statistic ``self_attn.o_proj``;
* ``post_attention_layernorm`` -> gate, up, statistic ``mlp.gate_proj``;
* up -> down: up's rows / s, down's columns * s (``down(act(gate) * up)`` is linear in up's output),
  statistic ``mlp.down_proj``.

A statistic left out skips its migration. A norm whose output does not scale with its weight (e.g. a
``1 + weight`` RMSNorm) is detected on a probe and refused.

Example::

    smooth_block(model.model.layers[0], {"self_attn.q_proj": a_q, "mlp.down_proj": a_d}, alpha=0.5)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..primitives.smoothquant import smoothing_scales, weight_absmax


def _get(block: nn.Module, path: str):
    try:
        return block.get_submodule(path)
    except AttributeError:
        raise ConfigError("smoothquant", f"{type(block).__name__} has no {path!r} (a Llama-style decoder block is expected)") from None


def _scale_cols(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)


def _scale_rows_down(lin: nn.Module, s: torch.Tensor) -> None:
    # lin's outputs (rows, and bias) / s: a norm (weight (K,)) or a linear (weight (K, *))
    w = lin.weight.data.float()
    lin.weight.data = (w / (s if w.ndim == 1 else s[:, None])).to(lin.weight.dtype)
    if getattr(lin, "bias", None) is not None:
        lin.bias.data = (lin.bias.data.float() / s).to(lin.bias.dtype)


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list, act: torch.Tensor, alpha: float, where: str) -> torch.Tensor:
    s = smoothing_scales(act, weight_absmax(*[l.weight for l in linears]), alpha, where)
    probe = torch.randn(4, s.numel(), generator=torch.Generator().manual_seed(0)).to(norm.weight.dtype)
    before = norm(probe).float()
    saved = [norm.weight.data.clone(), None if getattr(norm, "bias", None) is None else norm.bias.data.clone()]
    _scale_rows_down(norm, s)
    if not torch.allclose(norm(probe).float(), before / s, rtol=1e-3, atol=1e-6 * float(before.abs().max())):
        norm.weight.data = saved[0]
        if saved[1] is not None:
            norm.bias.data = saved[1]
        raise ConfigError("smoothquant", f"{where}: the norm's output does not scale with its weight; cannot fold "
                          "the smoothing factors into it")
    for lin in linears:
        _scale_cols(lin, s)
    return s


@torch.no_grad()
def _fold_v_o(attn: nn.Module, act: torch.Tensor, alpha: float) -> torch.Tensor:
    v, o = attn.v_proj, attn.o_proj
    kv, heads_in = v.out_features, o.in_features
    if heads_in % kv:
        raise ConfigError("smoothquant", f"v_proj has {kv} outputs, o_proj {heads_in} inputs: not a grouped layout")
    groups = heads_in // kv
    if groups == 1:
        s = smoothing_scales(act, weight_absmax(o.weight), alpha, "self_attn.o_proj")
        s_o = s
    else:  # o input c = head h * hd + d reads kv channel (h // groups) * hd + d
        hd = int(getattr(attn, "head_dim", 0) or 0)
        if hd <= 0 or kv % hd:
            raise ConfigError("smoothquant", "grouped-query attention without a usable head_dim")
        view = (kv // hd, groups, hd)
        a = act.float().view(view).amax(dim=1).flatten()
        w = weight_absmax(o.weight).view(view).amax(dim=1).flatten()
        s = smoothing_scales(a, w, alpha, "self_attn.o_proj")
        s_o = s.view(kv // hd, 1, hd).expand(view).flatten()
    _scale_rows_down(v, s)
    _scale_cols(o, s_o)
    return s


@torch.no_grad()
def smooth_block(block: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Apply SmoothQuant to one decoder block in place; returns the factors used, by migration."""
    done: dict[str, torch.Tensor] = {}
    if "self_attn.q_proj" in act_absmax:
        qkv = [_get(block, f"self_attn.{p}_proj") for p in "qkv"]
        done["input_layernorm"] = _fold_norm(_get(block, "input_layernorm"), qkv, act_absmax["self_attn.q_proj"], alpha,
                                             "input_layernorm")
    if "self_attn.o_proj" in act_absmax:
        done["self_attn.v_proj"] = _fold_v_o(_get(block, "self_attn"), act_absmax["self_attn.o_proj"], alpha)
    if "mlp.gate_proj" in act_absmax:
        gu = [_get(block, "mlp.gate_proj"), _get(block, "mlp.up_proj")]
        done["post_attention_layernorm"] = _fold_norm(_get(block, "post_attention_layernorm"), gu,
                                                      act_absmax["mlp.gate_proj"], alpha, "post_attention_layernorm")
    if "mlp.down_proj" in act_absmax:
        up, down = _get(block, "mlp.up_proj"), _get(block, "mlp.down_proj")
        s = smoothing_scales(act_absmax["mlp.down_proj"], weight_absmax(down.weight), alpha, "mlp.down_proj")
        _scale_rows_down(up, s)
        _scale_cols(down, s)
        done["mlp.up_proj"] = s
    if not done:
        raise ConfigError("act_absmax", "no statistic for self_attn.q_proj, self_attn.o_proj, mlp.gate_proj or mlp.down_proj")
    return done


STAT_NAMES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def smoothquant_step(alpha: float):
    """SmoothQuant as a step of the block pipeline: the block's input maxima over the calibration
    tokens (summed -- max-reduced -- across processes), then :func:`smooth_block`."""
    from ..errors import ConfigError
    from ..pipeline.engine import BlockStep

    def apply(ctx):
        try:
            lins = {s: ctx.block.get_submodule(s) for s in STAT_NAMES}
        except AttributeError:
            raise ConfigError("smoothquant", f"{ctx.prefix.rstrip('.')}: needs Llama-style {', '.join(STAT_NAMES)} "
                              "modules") from None
        stats = ctx.collect(lins, "absmax")
        smooth_block(ctx.block, {s: stats[s].sum.float() for s in STAT_NAMES}, alpha)

    return BlockStep(apply, name="smoothquant")


def smoothquant_model(model: nn.Module, alpha: float, calib) -> list[str]:
    """Smooth every decoder block on the block pipeline (activation maxima of each block's inputs,
    which smoothing earlier blocks leaves unchanged in float). Returns the names of the blocks smoothed."""
    from ..pipeline.engine import run_in_memory
    from ..pipeline.skeleton import find_blocks

    if calib is None:
        from ..errors import ConfigError

        raise ConfigError("calib_data", "SmoothQuant needs calibration data (activation maxima): pass a CalibrationSet "
                          "or use the CLI's --calib")
    prefix, blocks = find_blocks(model)
    run_in_memory(model, [smoothquant_step(alpha)], calib)
    return [f"{prefix}.{i}" for i in range(len(blocks))]
