"""Pruning: configs, the ``prune_`` verb, sparsity reports. Heavy parts import lazily."""

from .apply import make_permanent_, prune_
from .config import (
           MagnitudePruneConfig,
           SparseGPTConfig,
           StructuredPruneConfig,
           WandaConfig,
)
from .report import SparsityReport, sparsity_report

__all__ = ["MagnitudePruneConfig", "SparseGPTConfig", "SparsityReport", "StructuredPruneConfig", "WandaConfig",
           "make_permanent_", "prune_", "sparsity_report"]
