"""The recipe runners of the quantization stages: ``runner(model, stage, records, calib_data)``
applies the stage in place and appends a :class:`~torchcompress.records.LayerRecord` per module."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..api import quantize_
from ..eval.metrics import sqnr_and_mse
from ..records import LayerRecord, tensor_bytes
from .schema import Stage


def record_quant(stage: Stage, records: list, gptq_losses: dict | None = None) -> Callable:
    """``on_module`` for a quantization stage (weight SQNR/MSE of packed modules, GPTQ's layer loss)."""
    def on_module(name: str, old: nn.Module, new: nn.Module) -> None:
        w = old.weight.detach()
        rec = LayerRecord(stage.name, name, stage.kind, w.numel(), tensor_bytes(old), tensor_bytes(new))
        if getattr(new, "is_packed", False):
            w_hat = new.dequantize(torch.float32)
            rec.sqnr_db, rec.mse = sqnr_and_mse(w, w_hat)
            rec.bits_per_weight = new.weight_bits() / w.numel()
        if gptq_losses is not None:
            rec.gptq_loss = gptq_losses.pop(name, None)
        info = getattr(new, "gptq_info", None) or {}
        if info.get("fallback_rtn"):
            rec.rtn_fallback = str(info.get("fallback_reason", "Hessian not positive definite"))
        records.append(rec)

    return on_module


def run_quantize(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    quantize_(model, stage.config, targets=stage.targets, ignore=stage.ignore, on_module=record_quant(stage, records))


def run_gptq(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    from ..quant.gptq import gptq_model

    state = getattr(calib_data, "state_dir", None)
    losses: dict = {}  # filled just before each on_module call, so the record (and its span) carries it
    gptq_model(model, stage.config, calib_data, targets=stage.targets, ignore=stage.ignore,
               on_module=record_quant(stage, records, losses), on_loss=losses.__setitem__,
               state_dir=None if state is None else f"{state}/{stage.name}",
               offload_dir=getattr(calib_data, "offload_dir", None))


def run_autoround(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    from ..quant.autoround import autoround_model

    autoround_model(model, stage.config, calib_data, targets=stage.targets, ignore=stage.ignore,
                    on_module=record_quant(stage, records), offload_dir=getattr(calib_data, "offload_dir", None))


def run_gguf(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    from ..quant.gguf import quantize_gguf_

    quantize_gguf_(model, stage.config, targets=stage.targets, ignore=stage.ignore, on_module=record_quant(stage, records),
                   calib=calib_data)


def run_qat(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    from ..training.stages import run_qat as run

    run(model, stage, records, calib_data)


def run_distill(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    from ..training.stages import run_distill as run

    run(model, stage, records, calib_data)


def run_scheme(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    """FP8 / INT8 W8A8 / FP4 (issue #21)."""
    from ..quant.schemes import apply_scheme_

    apply_scheme_(model, stage.config, calib_data, targets=stage.targets, ignore=stage.ignore,
                  on_module=record_quant(stage, records))


def run_smoothquant(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    from ..quant.smoothquant import smoothquant_model

    blocks = smoothquant_model(model, stage.config.alpha, calib_data)  # float function unchanged; no module replaced
    for name in blocks:  # one record per smoothed block (weights rescaled in place, same bytes)
        m = model.get_submodule(name)
        params, size = sum(p.numel() for p in m.parameters()), tensor_bytes(m)
        records.append(LayerRecord(stage.name, name, stage.kind, params, size, size))


def record_rotation(stage: Stage, records: list) -> Callable:
    """``on_module`` of a rotate stage; refuses ``targets``/``ignore`` (the rotation is all or nothing)."""
    if stage.targets != (nn.Linear,) or stage.ignore is not None:
        from ..errors import RecipeError

        raise RecipeError(f"stage {stage.name!r} (rotate): 'targets' and 'ignore' do not apply (the residual stream "
                          "is rotated in every module that reads or writes it, or not at all)")

    def on_module(name: str, m: nn.Module) -> None:  # weights rotated in place: same bytes
        size = tensor_bytes(m)
        records.append(LayerRecord(stage.name, name, stage.kind, sum(p.numel() for p in m.parameters()), size, size))

    return on_module


def budget_recorder(stage: Stage, records: list, choice: dict, losses: dict | None = None) -> Callable:
    """``on_module`` of the budget stage: the usual record, plus the layer's chosen candidate
    (``choice``: module name -> option, filled once the plan is solved)."""
    inner = record_quant(stage, records, losses)

    def on_module(name: str, old: nn.Module, new: nn.Module) -> None:
        inner(name, old, new)
        opt = choice.get(name)
        records[-1].choice = None if opt is None else opt.label

    return on_module


def run_rotate(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    """Residual-stream rotation (issue #22): float function unchanged, every module's weights rotated."""
    from ..quant.rotation import rotate_

    rotate_(model, stage.config, on_module=record_rotation(stage, records))


def record_awq(stage: Stage, records: list) -> Callable:
    """``on_group`` for an AWQ stage: one record per group of linears (rescaled in place, same bytes;
    a skipped group is recorded with the reason)."""
    def on_group(r) -> None:
        records.append(LayerRecord(stage.name, r.prev, stage.kind, r.params, r.bytes, r.bytes, note=r.describe()))

    return on_group


def run_awq(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    from ..quant.awq import awq_model

    awq_model(model, stage.config, calib_data, on_group=record_awq(stage, records),
              offload_dir=getattr(calib_data, "offload_dir", None))


def run_budget(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    """Mixed precision under a size budget (issue #22 item 5): sensitivity, exact knapsack, quantize."""
    from ..quant.budget import budget_model

    losses: dict = {}
    choice: dict = {}
    budget_model(model, stage.config, calib_data, targets=stage.targets, ignore=stage.ignore,
                 on_module=budget_recorder(stage, records, choice, losses), on_loss=losses.__setitem__,
                 on_plan=lambda plan: choice.update(plan.choice), offload_dir=getattr(calib_data, "offload_dir", None))
