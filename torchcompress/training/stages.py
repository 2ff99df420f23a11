"""Recipe runners for ``kind: qat`` and ``kind: distill`` (registered in recipe/runner.py's _RUNNERS).

Both train on the calibration set handed to ``compress`` (rows of token ids + attention mask).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..api import freeze_, quantize_
from ..errors import InputError
from ..records import tensor_bytes
from .loop import BatchSchedule, causal_lm_loss, train

log = logging.getLogger(__name__)


def _data(calib_data, cfg, stage) -> BatchSchedule:
    if calib_data is None or not hasattr(calib_data, "input_ids"):
        raise InputError(f"stage {stage.name} ({stage.kind}) trains on text: give calibration data (CLI: --calib)")
    return BatchSchedule(calib_data.input_ids, calib_data.attention_mask, cfg.batch_size, cfg.seed)


def run_qat(model: nn.Module, stage, records: list, calib_data) -> None:
    from ..distill.distiller import Distiller
    from ..eval.metrics import mse, sqnr
    from ..records import LayerRecord

    cfg = stage.config
    data = _data(calib_data, cfg, stage)
    teacher = copy.deepcopy(model).eval() if cfg.teacher == "float" else None
    replaced: list = []
    quantize_(model, cfg.prepare_config(), targets=stage.targets, ignore=stage.ignore,
              on_module=lambda name, old, new: replaced.append((name, old, new) if new is not old else None))
    replaced = [r for r in replaced if r is not None]  # (GGUF: rows that fit no block stay float)
    if teacher is not None:
        d = Distiller(teacher, cfg.kd())
        loss_fn = lambda m, ids, mask: d.loss(m, ids, mask)
    else:
        loss_fn = causal_lm_loss
    with torch.enable_grad():
        losses = train(model, data, loss_fn, cfg.settings())
    log.info("stage %s: loss %.4f -> %.4f over %d steps", stage.name, losses[0], losses[-1], len(losses))
    if cfg.freeze:
        freeze_(model)
    for name, old, new in replaced:
        if cfg.freeze and cfg.qtype is not None:
            new = model.get_submodule(name)  # the GGUFLinear that replaced the fake-quant layer
        w = old.weight.detach()
        rec = LayerRecord(stage.name, name, stage.kind, w.numel(), tensor_bytes(old), tensor_bytes(new))
        if new.is_packed:
            w_hat = new.dequantize(torch.float32)
            rec.sqnr_db, rec.mse, rec.bits_per_weight = sqnr(w, w_hat), mse(w, w_hat), new.weight_bits() / w.numel()
        records.append(rec)
    model.eval()


def run_distill(model: nn.Module, stage, records: list, calib_data) -> None:
    from ..distill.distiller import Distiller
    from ..distill.progressive import drop_layers_, layer_stack
    from ..distill.self_distill import EMATeacher
    from ..records import LayerRecord

    cfg = stage.config
    data = _data(calib_data, cfg, stage)
    before = tensor_bytes(model)
    n_params = sum(p.numel() for p in model.parameters())
    hooks = []
    if cfg.teacher == "copy":
        teacher = copy.deepcopy(model).eval()
    if cfg.keep is not None:
        n_before = len(layer_stack(model)[1])
        kept = drop_layers_(model, cfg.keep)
        log.info("stage %s: student keeps %d of %d layers: %s", stage.name, len(kept), n_before, list(kept))
    if cfg.teacher == "ema":
        teacher = EMATeacher(model, decay=cfg.ema_decay)
        hooks.append(teacher)
    d = Distiller(teacher, cfg.kd())
    with torch.enable_grad():
        losses = train(model, data, lambda m, ids, mask: d.loss(m, ids, mask), cfg.settings(), hooks=hooks)
    log.info("stage %s: loss %.4f -> %.4f over %d steps", stage.name, losses[0], losses[-1], len(losses))
    records.append(LayerRecord(stage.name, "<model>", stage.kind, n_params, before, tensor_bytes(model)))
    model.eval()
