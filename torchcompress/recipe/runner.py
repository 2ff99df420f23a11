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

from ..eval.size import bytes_by_module_type, model_bytes
from ..records import LayerRecord, StageRecord, tensor_bytes  # noqa: F401  (public here too)
from .registry import RUNNERS
from .schema import Recipe, Stage

log = logging.getLogger(__name__)


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


def compress(model: nn.Module, recipe: Recipe, calib_data=None, *, on_stage: Callable | None = None) -> Report:
    """Apply ``recipe`` to ``model`` in place and return a :class:`Report`.

    ``calib_data`` is handed to stages that need activations (none of the RTN stages do).
    ``on_stage(stage_record)`` is called after each stage (the CLI prints a line).
    """
    from ..pipeline.experts import unfuse_experts_
    from ..telemetry.run import for_run

    unfuse_experts_(model)  # transformers 5 fuses MoE experts into 3-D tensors: one nn.Linear per projection
    report = Report(recipe=recipe.name, size_bytes_before=model_bytes(model), size_bytes_after=0,
                    bytes_by_type_before=bytes_by_module_type(model))
    from ..telemetry.memory import PeakMemory

    tel = for_run(recipe)  # OpenTelemetry spans compress > stage > layer (from the LayerRecords) + metrics; no-op when off
    device = next((p.device for p in model.parameters()), None)
    with tel.run(report, calib_data):
        for i, stage in enumerate(recipe.stages):
            runner = RUNNERS[type(stage.config)]
            start = time.perf_counter()
            before = len(report.layers)
            meter = PeakMemory(device)  # the stage's peak host / CUDA memory: report and stage span
            with torch.no_grad(), tel.stage(i, stage, report.layers, memory=meter) as records, meter:
                runner(model, stage, records, calib_data)
            rec = StageRecord(stage.name, stage.kind, time.perf_counter() - start, len(report.layers) - before,
                              meter.peak_rss_bytes, meter.peak_cuda_bytes)
            if rec.modules == 0:
                check_composes(recipe, stage, report.stages)
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


def check_composes(recipe: Recipe, stage: Stage, earlier: list) -> None:
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
