"""Run a recipe's stages in order on a model, in place, and measure what each did.

No global session: ``compress(model, recipe)`` owns everything it needs and returns a Report.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..api import quantize_
from ..config import QATConfig, RTNConfig
from ..eval.metrics import mse, sqnr
from ..eval.size import bytes_by_module_type, model_bytes
from .schema import Recipe, Stage

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """What one stage did to one module."""

    stage: str
    module: str
    kind: str
    params: int
    bytes_before: int
    bytes_after: int
    sqnr_db: float | None = None  # weight SQNR, float vs compressed
    mse: float | None = None
    bits_per_weight: float | None = None
    # GPTQ: trace((W - W_hat) H (W - W_hat)^T) with H = 2 X^T X / tokens, the layer's output error
    # on the calibration data (what GPTQ minimises)
    gptq_loss: float | None = None


@dataclass
class StageRecord:
    name: str
    kind: str
    seconds: float
    modules: int


@dataclass
class Report:
    recipe: str
    size_bytes_before: int
    size_bytes_after: int
    stages: list[StageRecord] = field(default_factory=list)
    layers: list[LayerRecord] = field(default_factory=list)
    bytes_by_type_before: dict = field(default_factory=dict)
    bytes_by_type_after: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # filled by callers: eval results, disk sizes, data used

    @property
    def compression_ratio(self) -> float:
        return self.size_bytes_before / max(self.size_bytes_after, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression_ratio"] = self.compression_ratio
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """Inverse of :meth:`to_dict` (keys other than the fields go back to ``extra``)."""
        names = {"recipe", "size_bytes_before", "size_bytes_after", "bytes_by_type_before", "bytes_by_type_after"}
        rep = cls(**{k: d[k] for k in names if k in d})
        rep.stages = [StageRecord(**s) for s in d.get("stages", [])]
        rep.layers = [LayerRecord(**r) for r in d.get("layers", [])]
        skip = names | {"stages", "layers", "compression_ratio"}
        rep.extra = {k: v for k, v in d.items() if k not in skip}
        return rep


def _tensor_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def _record_quant(stage: Stage, records: list, gptq_losses: dict | None = None) -> Callable:
    def on_module(name: str, old: nn.Module, new: nn.Module) -> None:
        w = old.weight.detach()
        rec = LayerRecord(stage.name, name, stage.kind, w.numel(), _tensor_bytes(old), _tensor_bytes(new))
        if getattr(new, "is_packed", False):
            w_hat = new.dequantize(torch.float32)
            rec.sqnr_db = sqnr(w, w_hat)
            rec.mse = mse(w, w_hat)
            rec.bits_per_weight = new.weight_bits() / w.numel()
        if gptq_losses is not None:
            rec.gptq_loss = gptq_losses.pop(name, None)
        records.append(rec)

    return on_module


def _run_quantize(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    quantize_(model, stage.config, targets=stage.targets, ignore=stage.ignore, on_module=_record_quant(stage, records))


# stage config type -> runner(model, stage, records, calib_data); techniques add theirs here.
_RUNNERS: dict[type, Callable] = {RTNConfig: _run_quantize, QATConfig: _run_quantize}


def _run_gptq(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    from ..calibration.runner import gptq_model

    state = getattr(calib_data, "state_dir", None)
    losses: dict = {}  # filled just before each on_module call, so the record (and its span) carries it
    gptq_model(model, stage.config, calib_data, targets=stage.targets, ignore=stage.ignore,
               on_module=_record_quant(stage, records, losses), on_loss=losses.__setitem__,
               state_dir=None if state is None else f"{state}/{stage.name}",
               offload_dir=getattr(calib_data, "offload_dir", None))


from ..config import GPTQConfig  # noqa: E402

_RUNNERS[GPTQConfig] = _run_gptq


def _run_gguf(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    from ..quant.gguf import quantize_gguf_

    quantize_gguf_(model, stage.config, targets=stage.targets, ignore=stage.ignore, on_module=_record_quant(stage, records),
                   calib=calib_data)


from ..config import GGUFConfig  # noqa: E402

_RUNNERS[GGUFConfig] = _run_gguf


def _run_qat(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    from ..training.stages import run_qat

    run_qat(model, stage, records, calib_data)


def _run_distill(model: nn.Module, stage: Stage, records: list, calib_data) -> None:
    from ..training.stages import run_distill

    run_distill(model, stage, records, calib_data)


from ..config import DistillConfig, QATTrainConfig  # noqa: E402  (issue #7)

_RUNNERS.update({QATTrainConfig: _run_qat, DistillConfig: _run_distill})


def compress(model: nn.Module, recipe: Recipe, calib_data=None, *, on_stage: Callable | None = None) -> Report:
    """Apply ``recipe`` to ``model`` in place and return a :class:`Report`.

    ``calib_data`` is handed to stages that need activations (none of the RTN stages do).
    ``on_stage(stage_record)`` is called after each stage (the CLI prints a line).
    """
    from ..telemetry.run import for_run

    report = Report(recipe=recipe.name, size_bytes_before=model_bytes(model), size_bytes_after=0,
                    bytes_by_type_before=bytes_by_module_type(model))
    tel = for_run(recipe)  # OpenTelemetry spans compress > stage > layer (from the LayerRecords) + metrics; no-op when off
    with tel.run(report, calib_data):
        for i, stage in enumerate(recipe.stages):
            runner = _RUNNERS[type(stage.config)]
            start = time.perf_counter()
            before = len(report.layers)
            with torch.no_grad(), tel.stage(i, stage, report.layers) as records:
                runner(model, stage, records, calib_data)
            rec = StageRecord(stage.name, stage.kind, time.perf_counter() - start, len(report.layers) - before)
            if rec.modules == 0:
                _check_composes(recipe, stage, report.stages)
                log.warning("stage %s (%s) changed no module: check its targets/ignore", stage.name, stage.kind)
            report.stages.append(rec)
            if on_stage is not None:
                on_stage(rec)
        report.size_bytes_after = model_bytes(model)
        report.bytes_by_type_after = bytes_by_module_type(model)
        from ..eval.size import sparse_bytes

        sparse = sparse_bytes(model)  # 2:4 layers as compressed-tensors sparse-24-bitmask would store them
        if sparse is not None:
            report.extra["sparse_bytes_after"] = sparse
    return report


def _check_composes(recipe: Recipe, stage: Stage, earlier: list) -> None:
    """A stage that finds nothing to change after an earlier stage changed modules does not compose
    with it (e.g. rtn after rtn: the Linears are QuantLinears now): an error, not a silent no-op."""
    from ..errors import RecipeError

    changed = [s for s in earlier if s.modules]
    if changed:
        raise RecipeError(f"stage {stage.name!r} ({stage.kind}) found no module to change after stage {changed[-1].name!r} "
                          f"({changed[-1].kind}) replaced {changed[-1].modules}: these stages do not compose "
                          "(give them disjoint targets or drop one)", recipe.source)


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy to keep as the uncompressed reference (for KL divergence)."""
    return copy.deepcopy(model)

from ..prune.stages import PRUNE_CONFIGS, run_prune_stage  # noqa: E402  (pruning, issue #6)

_RUNNERS.update({cfg: run_prune_stage for cfg in PRUNE_CONFIGS})

from ..lowrank.stages import LOWRANK_RUNNERS  # noqa: E402  (low-rank, issue #8)

_RUNNERS.update(LOWRANK_RUNNERS)
