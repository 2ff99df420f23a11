"""What a stage did to each module (shared by the recipe runner, the block pipeline and the techniques'
recipe stages, so none of them imports another's internals)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


def tensor_bytes(m: nn.Module) -> int:
    """Bytes of a module's state dict (parameters and persistent buffers)."""
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


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
    # GPTQ fell back to round-to-nearest: why (an expert too few calibration tokens reached, or a
    # Hessian that would not factor); None when GPTQ ran
    rtn_fallback: str | None = None
    note: str | None = None  # what a stage that changes no module's type did (AWQ: the scales chosen, or why skipped)
    choice: str | None = None  # the budget search's pick for this layer ("W4 g64", "Q4_K")


@dataclass
class StageRecord:
    name: str
    kind: str
    seconds: float
    modules: int
    # the stage's peak host RSS and CUDA memory (telemetry/memory.py: exact when the stage set the
    # process's peak, else sampled); None where not measured
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None
