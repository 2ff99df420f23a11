"""Recipe stages ``lora`` and ``svd``: run the verbs and record what each did to each module.

A ``lora`` stage without ``targets`` adapts :class:`LoRAConfig`'s default targets (``q_proj``,
``v_proj``); a stage's own ``targets`` / ``ignore`` override them. An ``svd`` stage is
:func:`lowrank_` with the stage's targets (default: every Linear except ``lm_head`` and embeddings).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..eval.metrics import sqnr_and_mse
from ..records import LayerRecord, tensor_bytes
from .config import LoRAConfig, SVDConfig


def run_lora_stage(model: nn.Module, stage, records: list, calib_data) -> None:
    from .lora import add_lora_

    def on_module(name, old, new):
        adapter = new.lora_A.weight.numel() + new.lora_B.weight.numel()
        records.append(LayerRecord(stage.name, name, stage.kind, adapter, tensor_bytes(old), tensor_bytes(new)))

    targets = None if tuple(stage.targets) == (nn.Linear,) else stage.targets
    add_lora_(model, stage.config, targets=targets, ignore=("lm_head",) if stage.ignore is None else stage.ignore,
              on_module=on_module)


def svd_recorder(stage, records: list):
    """``on_module`` for an SVD stage: a LayerRecord per factorized module."""
    def on_module(name, old, new):
        w = old.weight.detach()
        rec = LayerRecord(stage.name, name, stage.kind, w.numel(), tensor_bytes(old), tensor_bytes(new))
        with torch.no_grad():
            w_hat = new.weight.detach()
        rec.sqnr_db, rec.mse = sqnr_and_mse(w, w_hat)
        rec.bits_per_weight = new.rank * (new.in_features + new.out_features) * w.element_size() * 8 / w.numel()  # factor bits per original weight
        records.append(rec)

    return on_module


def run_svd_stage(model: nn.Module, stage, records: list, calib_data) -> None:
    from .svd import lowrank_

    on_module = svd_recorder(stage, records)
    kw = {} if stage.ignore is None else {"ignore": stage.ignore}
    lowrank_(model, stage.config, targets=stage.targets, calib_data=calib_data, on_module=on_module, **kw)


LOWRANK_RUNNERS = {LoRAConfig: run_lora_stage, SVDConfig: run_svd_stage}
