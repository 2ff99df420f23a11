"""Every recipe stage kind in one explicit table: YAML ``kind`` -> config class -> runner.

A new technique adds its line here (and nowhere else): its config class in :data:`STAGE_KINDS`
and its ``runner(model, stage, records, calib_data)`` in :data:`RUNNERS`.
"""

from __future__ import annotations

from typing import Callable

from ..config import STAGE_KINDS as CORE_KINDS
from ..config import GPTQConfig, HQQConfig, QATConfig, RTNConfig
from ..lowrank.config import LoRAConfig, SVDConfig
from ..lowrank.stages import run_lora_stage, run_svd_stage
from ..prune.config import MagnitudePruneConfig, SparseGPTConfig, StructuredPruneConfig, WandaConfig
from ..prune.stages import run_prune_stage
from ..quant.autoround_config import AutoRoundConfig
from ..quant.awq_config import AWQConfig
from ..quant.budget_config import BudgetConfig
from ..quant.gguf_config import GGUFConfig
from ..quant.rotation import RotateConfig
from ..training.config import DistillConfig, QATTrainConfig
from ..quant.scheme_config import SCHEME_STAGE_KINDS, FP4Config, FP8Config, SmoothQuantConfig, W8A8Int8Config
from .stage_runners import (run_autoround, run_awq, run_budget, run_distill, run_gguf, run_gptq, run_qat,
                            run_quantize, run_rotate, run_scheme, run_smoothquant)

STAGE_KINDS: dict[str, type] = {
    **CORE_KINDS,  # rtn, qat_prepare (and any kind a config module registers beside its class)
    "gptq": GPTQConfig,
    "gguf": GGUFConfig,
    "autoround": AutoRoundConfig,  # sign-gradient rounding (issue #22)
    "prune_magnitude": MagnitudePruneConfig,
    "wanda": WandaConfig,
    "sparsegpt": SparseGPTConfig,
    "prune_structured": StructuredPruneConfig,
    "lora": LoRAConfig,
    "svd": SVDConfig,
    "qat": QATTrainConfig,
    "distill": DistillConfig,
    "budget": BudgetConfig,  # mixed precision under a size budget (issue #22 item 5)
    **SCHEME_STAGE_KINDS,  # fp8, w8a8_int8, smoothquant, fp4 (issue #21)
    "rotate": RotateConfig,  # residual-stream Hadamard rotation (issue #22)
    "awq": AWQConfig,  # issue #22: scales + clip on float weights; a following rtn/gptq/gguf stage quantizes
}

RUNNERS: dict[type, Callable] = {
    RTNConfig: run_quantize,
    QATConfig: run_quantize,
    HQQConfig: run_quantize,  # data-free HQQ (issue #22): quantize_ dispatches on the config type
    GPTQConfig: run_gptq,
    GGUFConfig: run_gguf,
    AutoRoundConfig: run_autoround,
    MagnitudePruneConfig: run_prune_stage,
    WandaConfig: run_prune_stage,
    SparseGPTConfig: run_prune_stage,
    StructuredPruneConfig: run_prune_stage,
    LoRAConfig: run_lora_stage,
    SVDConfig: run_svd_stage,
    QATTrainConfig: run_qat,
    DistillConfig: run_distill,
    FP8Config: run_scheme,
    W8A8Int8Config: run_scheme,
    FP4Config: run_scheme,
    SmoothQuantConfig: run_smoothquant,
    RotateConfig: run_rotate,
    AWQConfig: run_awq,
    BudgetConfig: run_budget,
}
