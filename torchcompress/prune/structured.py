"""Structured pruning of transformers decoders: MLP intermediate channels and attention heads.

A plan holds, per decoder block, the kept MLP channels and the kept key/value heads (each with its
group of query heads, so grouped-query attention stays consistent). Applying it either shrinks the
linears physically (gate/up rows + down_proj columns; q rows of the kept query heads, k/v rows of
the kept kv heads, o_proj columns of the kept query heads) and updates the model config, or, for
per-layer rates the config cannot express, zeroes the same rows/columns with PrunedLinear masks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..nn.pruned_linear import PrunedLinear
from ..primitives.sparsity import column_importance, keep_indices, row_importance
from ..targets import set_submodule
from .activation import adaptive_counts, input_norms
from .config import StructuredPruneConfig

log = logging.getLogger(__name__)

_MLP = ("gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class BlockPlan:
    mlp_keep: torch.Tensor | None  # sorted kept intermediate channels (None: untouched)
    kv_keep: torch.Tensor | None  # sorted kept kv heads (None: untouched)


def _weight(m: nn.Linear) -> torch.Tensor:
    w = m.weight.detach().float()
    return w * m.mask if isinstance(m, PrunedLinear) else w


def _parts(block: nn.Module, names: tuple, prefix: str):
    mods = {n: block.get_submodule(f"{prefix}.{n}") if _has(block, f"{prefix}.{n}") else None for n in names}
    if any(m is None for m in mods.values()):
        return None
    return mods


def _has(block, name):
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False


def _group_norm(v: torch.Tensor, groups: int, p: int) -> torch.Tensor:
    """Norm of each of ``groups`` equal consecutive slices of ``v``'s last dim, combined with ``p``."""
    v = v.reshape(groups, -1)
    return v.abs().sum(1) if p == 1 else v.pow(2).sum(1).sqrt()


def _mlp_scores(mlp: dict, p: int, act: torch.Tensor | None) -> torch.Tensor:
    down = _weight(mlp["down_proj"])
    if act is not None:  # ||X_j|| * ||W_down[:, j]||: the channel's contribution to the block output
        return act * column_importance(down, 2)
    g, u = _weight(mlp["gate_proj"]), _weight(mlp["up_proj"])
    parts = torch.stack([row_importance(g, p), row_importance(u, p), column_importance(down, p)])
    return parts.sum(0) if p == 1 else parts.pow(2).sum(0).sqrt()


def _head_scores(attn: dict, n_kv: int, p: int, act: torch.Tensor | None) -> torch.Tensor:
    o = _weight(attn["o_proj"])
    if act is not None:
        per_col = act * column_importance(o, 2)
        return _group_norm(per_col, n_kv, 2)
    pieces = [_group_norm(row_importance(_weight(attn[n]), p), n_kv, p) for n in ("q_proj", "k_proj", "v_proj")]
    pieces.append(_group_norm(column_importance(o, p), n_kv, p))
    s = torch.stack(pieces)
    return s.sum(0) if p == 1 else s.pow(2).sum(0).sqrt()


def _kv_heads(model) -> tuple[int, int, int]:
    c = model.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    return heads, kv, hd


@torch.no_grad()
def plan_structured(model: nn.Module, cfg: StructuredPruneConfig, calib, chosen: dict, batch_size: int = 8) -> list[BlockPlan]:
    from ..pipeline.skeleton import find_blocks

    prefix, blocks = find_blocks(model)
    ids = {id(m) for m in chosen.values()}
    n_kv = _kv_heads(model)[1] if cfg.head_ratio else 0
    mlps, attns = [], []
    for b, block in enumerate(blocks):
        mlp = _parts(block, _MLP, "mlp") if cfg.mlp_ratio else None
        attn = _parts(block, _ATTN, "self_attn") if cfg.head_ratio else None
        for part, names, what, ratio in ((mlp, _MLP, "mlp", cfg.mlp_ratio), (attn, _ATTN, "self_attn", cfg.head_ratio)):
            if ratio and part is None:
                raise InputError(f"{prefix}.{b}.{what}: no {'/'.join(names)} linears; structured pruning supports "
                                 "Llama-style decoders (gate/up/down MLP, q/k/v/o attention)")
        mlps.append(mlp if mlp is not None and all(id(m) in ids for m in mlp.values()) else None)
        attns.append(attn if attn is not None and all(id(m) in ids for m in attn.values()) else None)
    for parts, ratio, what in ((mlps, cfg.mlp_ratio, "MLP"), (attns, cfg.head_ratio, "attention")):
        if ratio and cfg.allocation == "uniform" and any(p is None for p in parts) and any(p is not None for p in parts):
            raise ConfigError("targets", f"uniform structured pruning shrinks every block's {what} by the same count "
                              "(one size in the model config): select all blocks or none")
    acts_mlp, acts_o = {}, {}
    if cfg.importance == "activation":
        hooked = {f"m{b}": m["down_proj"] for b, m in enumerate(mlps) if m is not None}
        hooked.update({f"a{b}": a["o_proj"] for b, a in enumerate(attns) if a is not None})
        norms = input_norms(model, hooked, calib, batch_size)
        acts_mlp = {b: norms[f"m{b}"] for b in range(len(blocks)) if f"m{b}" in norms}
        acts_o = {b: norms[f"a{b}"] for b in range(len(blocks)) if f"a{b}" in norms}
    p = 1 if cfg.importance == "l1" else 2
    mlp_scores = [None if m is None else _mlp_scores(m, p, acts_mlp.get(b)) for b, m in enumerate(mlps)]
    head_scores = [None if a is None else _head_scores(a, n_kv, p, acts_o.get(b)) for b, a in enumerate(attns)]
    live = [s for s in mlp_scores if s is not None]
    if cfg.allocation == "adaptive" and live:
        counts = iter(adaptive_counts(live, cfg.mlp_ratio, cfg.max_layer_ratio))
        mlp_drop = [None if s is None else next(counts) for s in mlp_scores]
    else:
        mlp_drop = [None if s is None else int(round(cfg.mlp_ratio * s.numel())) for s in mlp_scores]
    plans = []
    for s, drop, hs in zip(mlp_scores, mlp_drop, head_scores):
        mk = None if s is None or not drop else keep_indices(s, s.numel() - drop)
        kk = None
        if hs is not None:
            g_drop = int(round(cfg.head_ratio * n_kv))
            if g_drop >= n_kv:
                raise ConfigError("head_ratio", f"would remove all {n_kv} key/value heads")
            kk = keep_indices(hs, n_kv - g_drop) if g_drop else None
        plans.append(BlockPlan(mk, kk))
    return plans


def _shrink(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = _weight(lin).to(lin.weight.dtype)
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device="meta")
    new.weight = nn.Parameter(w.contiguous().clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        b = lin.bias.detach()
        new.bias = nn.Parameter((b[rows.to(b.device)] if rows is not None else b).clone(), requires_grad=lin.bias.requires_grad)
    return new


def _masked(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> PrunedLinear:
    keep = torch.zeros(lin.weight.shape, dtype=torch.bool, device=lin.weight.device)
    if rows is not None:
        keep[rows.to(keep.device)] = True
    if cols is not None:
        c = torch.zeros(lin.in_features, dtype=torch.bool, device=keep.device)
        c[cols.to(keep.device)] = True
        keep = c.expand_as(keep).clone()
    if isinstance(lin, PrunedLinear):
        keep &= lin.mask
    return PrunedLinear.from_linear(lin, keep)


def _head_rows(kv_keep: torch.Tensor, per: int, hd: int) -> torch.Tensor:
    """Rows of a projection laid out head-major (``per`` heads of ``hd`` rows for each kv head)."""
    heads = (kv_keep[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
    return (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)


@torch.no_grad()
def apply_plan(model: nn.Module, plans: list[BlockPlan], physical: bool, on_module=None) -> nn.Module:
    from ..pipeline.skeleton import find_blocks

    prefix, blocks = find_blocks(model)
    heads, n_kv, hd = _kv_heads(model)
    per = heads // n_kv
    make = _shrink if physical else _masked
    for b, (block, plan) in enumerate(zip(blocks, plans)):
        edits = []
        if plan.mlp_keep is not None:
            k = plan.mlp_keep
            edits += [("mlp.gate_proj", dict(rows=k)), ("mlp.up_proj", dict(rows=k)), ("mlp.down_proj", dict(cols=k))]
        if plan.kv_keep is not None:
            q_rows, kv_rows = _head_rows(plan.kv_keep, per, hd), _head_rows(plan.kv_keep, 1, hd)
            edits += [("self_attn.q_proj", dict(rows=q_rows)), ("self_attn.k_proj", dict(rows=kv_rows)),
                      ("self_attn.v_proj", dict(rows=kv_rows)), ("self_attn.o_proj", dict(cols=q_rows))]
        for n, kw in edits:
            old = block.get_submodule(n)
            new = make(old, **kw)
            set_submodule(model, f"{prefix}.{b}.{n}", new)
            if on_module is not None:
                on_module(f"{prefix}.{b}.{n}", old, new)
    if physical:
        _update_config(model, plans, heads, n_kv, hd)
    return model


def _update_config(model, plans, heads, n_kv, hd) -> None:
    c = model.config
    sizes = {int(p.mlp_keep.numel()) for p in plans if p.mlp_keep is not None}
    kvs = {int(p.kv_keep.numel()) for p in plans if p.kv_keep is not None}
    if len(sizes) > 1 or len(kvs) > 1:
        raise InputError("physically pruned blocks differ in size; the model config holds one size (use masks)")
    if sizes:
        c.intermediate_size = sizes.pop()
    if kvs:
        kv = kvs.pop()
        c.head_dim = hd  # no longer hidden_size // num_attention_heads
        c.num_attention_heads = kv * (heads // n_kv)
        c.num_key_value_heads = kv


def prune_structured(model: nn.Module, cfg: StructuredPruneConfig, calib, chosen: dict, *, on_module=None,
                     batch_size: int = 8) -> nn.Module:
    if not hasattr(model, "config"):
        raise InputError(f"{type(model).__name__}: structured pruning needs a transformers model with a config")
    plans = plan_structured(model, cfg, calib, chosen, batch_size)
    physical = cfg.allocation == "uniform" and cfg.physical
    if cfg.allocation == "adaptive":
        log.info("structured: adaptive per-layer rates are applied as masks (the model config holds one intermediate size)")
    return apply_plan(model, plans, physical, on_module)
