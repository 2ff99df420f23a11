"""Mixed precision under a size budget, on the block pipeline.

1. Every targeted Linear gets its candidates (:func:`options_for`) and their exact bytes (codes +
   scales + zeros, what ``QuantLinear.weight_bits`` / ``GGUFLinear.weight_bits`` report).
2. The budget is checked against the feasible range before any forward pass (a typed
   :class:`BudgetError` naming the budget and the range).
3. Sensitivity: one float pass over the calibration data collects each linear's input statistic
   (diagonal or full ``H = 2 X^T X / T``); each candidate's predicted loss is the layer's output error
   ``tr((W - Q) H (W - Q)^T)`` with ``Q`` the candidate's round-to-nearest (or GGUF block) weight.
   The table is cached on disk, keyed by the model's weights, the calibration tokens and the candidates.
4. An exact multiple-choice knapsack (:func:`~torchcompress.primitives.knapsack.solve_mckp`) picks
   one candidate per layer minimising the summed loss within the budget.
5. The plan runs through the normal quantizers with a per-layer scheme: RTN ``QuantLinear``, GPTQ
   (``gptq_block`` per scheme, true-sequential within the block) or ``GGUFLinear`` blocks.

    plan = budget_model(model, BudgetConfig(target_bpw=4.5, method="gptq"), calib)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..config import GPTQConfig, Granularity, QuantScheme
from ..errors import ConfigError
from ..pipeline.engine import BlockStep
from ..primitives.gguf_common import LAYOUTS, GGMLType, row_bytes
from ..primitives.knapsack import solve_mckp
from ..primitives.packing import packed_len
from .budget_config import BudgetConfig

log = logging.getLogger(__name__)
CACHE_VERSION = "budget-sensitivity-v2"


class BudgetError(ConfigError):
    """A size budget outside what the candidates can reach (below the cheapest, above float)."""


@dataclass(frozen=True)
class Option:
    """One candidate for a layer: an integer scheme (bits, group size) or a GGUF block type."""

    label: str
    bits: int = 0
    group_size: int = 0
    qtype: int | None = None


def options_for(cfg: BudgetConfig, n: int, k: int) -> list[Option]:
    if cfg.method == "gguf":  # only block types whose block divides the row (llama.cpp needs whole blocks)
        return [Option(t, qtype=int(GGMLType[t])) for t in cfg.gguf_types if k % LAYOUTS[GGMLType[t]].block_size == 0]
    return [Option(f"W{b} g{g}", b, g) for b in cfg.bits for g in cfg.group_sizes]


def scheme_of(cfg: BudgetConfig, opt: Option) -> QuantScheme:
    return QuantScheme(bits=opt.bits, granularity=Granularity.GROUP, group_size=opt.group_size,
                       symmetric=cfg.symmetric, scale_dtype=cfg.scale_dtype)


def option_bytes(cfg: BudgetConfig, opt: Option, n: int, k: int) -> int:
    """Bytes of the layer's weight under ``opt``: codes + scales (+ zeros); the bias is not counted."""
    if opt.qtype is not None:
        return n * row_bytes(GGMLType(opt.qtype), k)
    groups = -(-k // opt.group_size)
    scale = scheme_of(cfg, opt).torch_scale_dtype.itemsize
    return n * packed_len(k, opt.bits) + n * groups * scale + (0 if cfg.symmetric else n * groups)


def quant_dequant(w: torch.Tensor, cfg: BudgetConfig, opt: Option, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight ``opt`` gives ``w`` (N, K) with the quantizer the plan will run."""
    if opt.qtype is not None:
        from ..primitives.gguf_blocks import IMATRIX_TYPES, dequantize, quantize

        qt = GGMLType(opt.qtype)
        imp = importance if qt in IMATRIX_TYPES else None
        return dequantize(quantize(w, qt, importance=imp), qt, tuple(w.shape)).to(w.device)
    from ..primitives.affine import fake_quantize

    return fake_quantize(w.float(), scheme_of(cfg, opt))


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)`` for a full (K, K) ``h``; ``sum_ij (W - Q)_ij^2 h_j`` for a diagonal (K,)."""
    e = w.float() - w_hat.float()  # (N, K)
    if h.dim() == 1:
        return float((e.square() * h.float()).sum(dtype=torch.float64))
    return float(((e @ h.float()) * e).sum(dtype=torch.float64))


def layer_losses(w: torch.Tensor, h: torch.Tensor, opts: list[Option], cfg: BudgetConfig,
                 importance: torch.Tensor | None = None) -> list[float]:
    return [output_error(w, quant_dequant(w, cfg, o, importance), h) for o in opts]


@dataclass
class BudgetPlan:
    target: str
    budget_bytes: int  # bytes the targeted Linears may take
    choice: dict  # module name -> Option
    layer_bytes: int  # bytes they take under the plan
    params: int
    predicted_loss: float
    exact: bool

    @property
    def bpw(self) -> float:
        return self.layer_bytes * 8 / self.params

    def summary(self) -> str:
        from collections import Counter

        mix = ", ".join(f"{n} {k}" for k, n in sorted(Counter(o.label for o in self.choice.values()).items()))
        return (f"budget {self.target}: {len(self.choice)} layers at {self.bpw:.3f} bits/weight "
                f"({self.layer_bytes:,} of {self.budget_bytes:,} bytes), predicted loss {self.predicted_loss:.4g}"
                f"{'' if self.exact else ' (costs rounded up to the DP grid)'}: {mix}")


class BudgetPlanner:
    """Candidates, their bytes and losses for the targeted layers; solves the knapsack.

    ``shapes``: module name -> (out, in); ``float_bytes``: their float weights' bytes; ``fixed_bytes``:
    every other tensor of the saved model; ``header_bytes``: the weights file's header allowance."""

    def __init__(self, cfg: BudgetConfig, shapes: dict, float_bytes: int, fixed_bytes: int, header_bytes: int = 0):
        self.cfg = cfg
        self.shapes = dict(shapes)
        self.options = {n: options_for(cfg, *s) for n, s in self.shapes.items()}
        for n, o in self.options.items():
            if not o:
                raise ConfigError("gguf_types", f"{n}: rows of {self.shapes[n][1]} weights fit none of "
                                  f"{', '.join(cfg.gguf_types)} (add Q4_0/Q8_0, blocks of 32, or ignore it)")
        self.costs = {n: [option_bytes(cfg, o, *self.shapes[n]) for o in opts] for n, opts in self.options.items()}
        self.params = sum(a * b for a, b in self.shapes.values())
        self.losses: dict[str, list[float]] = {}
        self.energy: dict[str, float] = {}  # tr(W H W^T): the layer's output energy on the calibration data
        self.importance: dict[str, torch.Tensor] = {}
        self.choice: dict[str, Option] = {}
        self.budget = self._budget(float_bytes, fixed_bytes, header_bytes)

    def _budget(self, float_bytes: int, fixed: int, header: int) -> int:
        if not self.shapes:
            raise ConfigError("targets", "the budget stage selects no Linear inside the decoder blocks")
        lo = sum(min(c) for c in self.costs.values())
        cheapest = self.cfg.bits[0] if self.cfg.method != "gguf" else "its cheapest fitting block type"
        n = len(self.shapes)
        if self.cfg.target_bpw is not None:
            t, lo_b, hi_b = float(self.cfg.target_bpw), lo * 8 / self.params, float_bytes * 8 / self.params
            if not lo_b <= t <= hi_b:
                raise BudgetError("target_bpw", f"{t:g} bits per weight is outside the feasible range {lo_b:.3f} .. "
                                  f"{hi_b:.3f} for the {n} targeted Linears ({self.params:,} weights; "
                                  f"{lo_b:.3f}: every layer at {cheapest if isinstance(cheapest, str) else f'{cheapest} bits'}"
                                  f", {hi_b:.3f}: float)")
            return math.floor(t * self.params / 8)
        t = self.cfg.target_bytes
        lo_t, hi_t = fixed + header + lo, fixed + header + float_bytes
        if not lo_t <= t <= hi_t:
            raise BudgetError("target_size", f"{self.cfg.target_size} ({t:,} bytes) is outside the feasible range "
                              f"{lo_t:,} .. {hi_t:,} bytes ({lo_t / 1e6:.2f} .. {hi_t / 1e6:.2f} MB: the {n} targeted "
                              f"Linears at their cheapest option .. float, plus {fixed + header:,} bytes of other tensors)")
        return t - fixed - header

    # -- sensitivity -----------------------------------------------------------------------------

    def sensitivity_step(self) -> BlockStep:
        """A read-only block step: the block's float outputs go on to the next block."""
        cfg = self.cfg
        kind = "hessian" if cfg.hessian == "full" else "diag"

        def apply(ctx):
            linears = self.block_linears(ctx)
            if not linears:
                return
            groups = ctx.linear_groups(linears)
            stats = ctx.collect({g[0]: linears[g[0]] for g in groups}, kind)
            for g in groups:
                st = stats[g[0]]
                tokens = max(float(st.tokens), 1.0)
                h = st.hessian().float() if kind == "hessian" else (st.sum * (2.0 / tokens)).float()
                mean_sq = (h.diagonal() if h.dim() == 2 else h) / 2  # llama.cpp's imatrix: mean x^2 per column
                imp = mean_sq.cpu() if cfg.method == "gguf" and cfg.imatrix else None
                for n in g:
                    full = ctx.prefix + n
                    w = linears[n].weight.detach().float()
                    self.losses[full] = layer_losses(w, h.to(w.device), self.options[full], cfg,
                                                     None if imp is None else imp.to(w.device))
                    self.energy[full] = output_error(w, torch.zeros_like(w), h.to(w.device))
                    if imp is not None:
                        self.importance[full] = imp

        return BlockStep(apply, needs_forward=True, name="budget-sensitivity")

    def block_linears(self, ctx) -> dict[str, nn.Module]:
        return {n: m for n, m in ctx.block.named_modules() if ctx.prefix + n in self.options and type(m) is nn.Linear}

    # -- cache ----------------------------------------------------------------------------------

    def cache_key(self, model_key: str, calib) -> str:
        c = self.cfg
        fields = {"v": CACHE_VERSION, "model": model_key, "calib": calib.sha256(), "hessian": c.hessian,
                  "kind": "gguf" if c.method == "gguf" else "int", "imatrix": c.imatrix if c.method == "gguf" else None,
                  "sym": c.symmetric, "scale": c.scale_dtype,
                  "options": {n: [o.label for o in opts] for n, opts in sorted(self.options.items())}}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def cache_path(self, key: str) -> Path:
        root = self.cfg.cache_dir or os.environ.get("TORCHCOMPRESS_CACHE_DIR") or "~/.cache/torchcompress/sensitivity"
        return Path(root).expanduser() / f"{key}.safetensors"

    def load_cache(self, key: str) -> bool:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.cache_path(key)
        if not path.is_file():
            return False
        try:
            t = load_file(str(path))
        except (OSError, SafetensorError) as e:
            log.warning("sensitivity cache %s unreadable (%s); measuring again", path, e)
            return False
        if any(f"{n}.losses" not in t or t[f"{n}.losses"].numel() != len(o) for n, o in self.options.items()):
            return False
        if any(f"{n}.energy" not in t for n in self.options):
            return False
        self.losses = {n: t[f"{n}.losses"].tolist() for n in self.options}
        self.energy = {n: float(t[f"{n}.energy"]) for n in self.options}
        self.importance = {n: t[f"{n}.importance"] for n in self.options if f"{n}.importance" in t}
        log.info("sensitivity from cache %s", path)
        return True

    def save_cache(self, key: str) -> None:
        from safetensors.torch import save

        from ..formats.atomic import atomic_write_bytes
        from ..errors import WriteError

        tensors = {f"{n}.losses": torch.tensor(v, dtype=torch.float64) for n, v in self.losses.items()}
        tensors.update({f"{n}.importance": v.float().clone() for n, v in self.importance.items()})
        tensors.update({f"{n}.energy": torch.tensor(v, dtype=torch.float64) for n, v in self.energy.items()})
        path = self.cache_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, save(tensors))
        except (OSError, WriteError) as e:  # a cache that cannot be written costs a re-measure, nothing more
            log.warning("sensitivity cache %s not written: %s", path, e)

    # -- plan -----------------------------------------------------------------------------------

    def solve(self) -> BudgetPlan:
        names = list(self.options)
        missing = [n for n in names if n not in self.losses]
        if missing:
            raise ConfigError("calib_data", f"{missing[0]}: no calibration token reached this layer")
        losses = [self.losses[n] for n in names]
        if self.cfg.relative:  # noise-to-signal at each layer's output: comparable across depths
            losses = [[v / max(self.energy[n], 1e-30) for v in ls] for n, ls in zip(names, losses)]
        res = solve_mckp([self.costs[n] for n in names], losses, self.budget)
        self.choice = {n: self.options[n][j] for n, j in zip(names, res.choice)}
        return BudgetPlan(self.cfg.describe_target(), self.budget, dict(self.choice), res.cost, self.params,
                          res.loss, res.exact)

    # -- apply ----------------------------------------------------------------------------------

    def apply_step(self, on_module: Callable | None = None, on_loss: Callable | None = None) -> BlockStep:
        """The plan as a block step: GPTQ per scheme (true-sequential), or RTN / GGUF blocks per layer."""
        cfg = self.cfg
        if cfg.method == "gptq":
            from .gptq import gptq_block

            def apply_gptq(ctx):
                linears = self.block_linears(ctx)
                for group in ctx.linear_groups(linears):  # execution order; each sees the quantized ones before
                    by_opt: dict = {}
                    for n in group:
                        by_opt.setdefault(self.choice[ctx.prefix + n], []).append(n)
                    for opt, names in by_opt.items():
                        g = GPTQConfig(scheme_of(cfg, opt), block_size=cfg.block_size, damp=cfg.damp,
                                       act_order=cfg.act_order, static_groups=cfg.static_groups, true_sequential=True)
                        gptq_block(ctx, g, {n: linears[n] for n in names}, on_module=on_module, on_loss=on_loss)

            return BlockStep(apply_gptq, needs_forward=True, name="budget-gptq")

        def apply(ctx):
            from ..targets import set_submodule

            for n, lin in self.block_linears(ctx).items():
                full = ctx.prefix + n
                new = self.quantized(lin, full)
                set_submodule(ctx.block, n, new)
                if on_module is not None:
                    on_module(full, lin, new)

        return BlockStep(apply, needs_forward=False, name=f"budget-{cfg.method}")

    def quantized(self, lin: nn.Linear, full: str) -> nn.Module:
        opt = self.choice[full]
        if opt.qtype is not None:
            from ..nn.gguf_linear import GGUFLinear
            from ..primitives.gguf_blocks import IMATRIX_TYPES

            qt = GGMLType(opt.qtype)
            imp = self.importance.get(full) if qt in IMATRIX_TYPES else None
            return GGUFLinear.from_linear(lin, qt, name=f"{full}.weight", importance=imp).to(lin.weight.device)
        from ..nn.quant_linear import QuantLinear

        return QuantLinear.from_linear(lin, scheme_of(self.cfg, opt), name=f"{full}.weight").to(lin.weight.device)


def header_allowance(other_keys, selected) -> int:
    """An upper bound on the safetensors header of the saved weights: 8 bytes + one JSON entry per
    tensor (name, dtype, shape, offsets: under 96 bytes besides the name); a quantized layer writes
    at most three tensors (qweight, scale, zero; or blocks)."""
    return 8 + sum(len(k) + 96 for k in other_keys) + sum(3 * (len(n) + 16 + 96) for n in selected)


def planner_for(model: nn.Module, cfg: BudgetConfig, targets, ignore, *, fixed_bytes: int | None = None,
                other_keys=None) -> BudgetPlanner:
    """The targeted Linears of ``model`` (real or on the meta device: only shapes are read).
    ``fixed_bytes``: the other tensors' bytes (default: ``model_bytes`` less the targeted weights)."""
    from ..eval.size import model_bytes
    from ..ignore import DEFAULT_IGNORE
    from ..pipeline.skeleton import find_blocks
    from ..targets import select_modules

    prefix, _ = find_blocks(model)
    chosen = [(n, m) for n, m in select_modules(model, targets, DEFAULT_IGNORE if ignore is None else ignore)
              if type(m) is nn.Linear]
    outside = [n for n, _ in chosen if not n.startswith(prefix + ".")]
    if outside:
        raise ConfigError("targets", f"{outside[0]} is outside the decoder blocks; the budget search covers the "
                          "blocks' Linears (add it to ignore)")
    if cfg.method == "gguf":  # rows no block type fits stay float (llama.cpp's F16 fallback), outside the plan
        unfit = [n for n, m in chosen if not options_for(cfg, *m.weight.shape)]
        for n in unfit:
            log.warning("budget: %s has rows of %d weights, no block of %s fits: it stays float", n,
                        model.get_submodule(n).in_features, ", ".join(cfg.gguf_types))
        chosen = [(n, m) for n, m in chosen if n not in unfit]
    shapes = {n: tuple(m.weight.shape) for n, m in chosen}
    float_bytes = sum(m.weight.numel() * m.weight.element_size() for _, m in chosen)
    if fixed_bytes is None:
        fixed_bytes = model_bytes(model) - float_bytes
    if other_keys is None:
        sel = {f"{n}.weight" for n in shapes}
        other_keys = [k for k in model.state_dict() if k not in sel]
    return BudgetPlanner(cfg, shapes, float_bytes, fixed_bytes, header_allowance(other_keys, shapes))


def weights_key(model: nn.Module, names) -> str:
    """sha256 of the named modules' weights (the cache key's model part)."""
    h = hashlib.sha256()
    for n in sorted(names):
        w = model.get_submodule(n).weight.detach().cpu().contiguous()
        h.update(f"{n}:{tuple(w.shape)}:{w.dtype}".encode())
        h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def budget_model(model: nn.Module, cfg: BudgetConfig, calib, *, targets=(nn.Linear,), ignore=None,
                 on_module: Callable | None = None, on_loss: Callable | None = None, batch_size: int = 8,
                 offload_dir=None, on_plan: Callable | None = None) -> BudgetPlan:
    """Quantize ``model``'s targeted decoder Linears in place with the mix that fits ``cfg``'s budget."""
    from ..pipeline.engine import run_in_memory

    planner = planner_for(model, cfg, targets, ignore)  # a budget out of range fails here, before any pass
    if calib is None:
        raise ConfigError("calib_data", "the budget search needs calibration data (--calib) for its layer errors")
    key = planner.cache_key(weights_key(model, planner.options), calib)
    if not planner.load_cache(key):
        run_in_memory(model, [planner.sensitivity_step()], calib, batch_size=batch_size, offload_dir=offload_dir)
        planner.save_cache(key)
    plan = planner.solve()
    log.info("%s", plan.summary())
    if on_plan is not None:
        on_plan(plan)
    run_in_memory(model, [planner.apply_step(on_module, on_loss)], calib, batch_size=batch_size, offload_dir=offload_dir)
    return plan
