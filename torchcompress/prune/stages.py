"""Recipe stages for pruning: run ``prune_`` and record what it did to each module."""

from __future__ import annotations

from torch import nn

from ..eval.metrics import sqnr_and_mse
from ..records import LayerRecord, tensor_bytes
from .config import (
    MagnitudePruneConfig,
    SparseGPTConfig,
    StructuredPruneConfig,
    WandaConfig,
)

PRUNE_CONFIGS = (MagnitudePruneConfig, WandaConfig, SparseGPTConfig, StructuredPruneConfig)


def prune_recorder(stage, records: list):
    """``on_module`` for a pruning stage: a LayerRecord per pruned module."""
    def on_module(name: str, old: nn.Module, new: nn.Module) -> None:
        w = old.weight.detach().float()
        rec = LayerRecord(stage.name, name, stage.kind, w.numel(), tensor_bytes(old), tensor_bytes(new))
        if new.weight.shape == w.shape:  # unstructured / masked: weight SQNR of the effective weight
            eff = new.weight.detach().float() * getattr(new, "mask", 1)
            rec.sqnr_db, rec.mse = sqnr_and_mse(w, eff)
        records.append(rec)

    return on_module


def run_prune_stage(model: nn.Module, stage, records: list, calib_data) -> None:
    from .apply import prune_

    on_module = prune_recorder(stage, records)
    state = getattr(calib_data, "state_dir", None)
    prune_(model, stage.config, targets=stage.targets, ignore=stage.ignore, calib_data=calib_data, on_module=on_module,
           state_dir=None if state is None else f"{state}/{stage.name}")
