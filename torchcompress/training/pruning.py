"""Gradual magnitude pruning during training with the cubic schedule of Zhu & Gupta (2017).

Sparsity rises from ``initial`` at ``begin_step`` to ``final`` at ``end_step``, updated every
``frequency`` steps::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3

fast at first (while many redundant weights remain), slowly towards the end. At each update the
chosen linears (wrapped in :class:`PrunedLinear`, so pruned weights get zero gradient) get new
per-layer magnitude masks; a pruned weight never comes back.

Plain loop::

    pruner = GradualPruner(model, final_sparsity=0.5, begin_step=0, end_step=1000, frequency=100)
    for step, batch in enumerate(loader):
        loss.backward(); opt.step(); opt.zero_grad()
        pruner.step(step + 1)

Hugging Face Trainer: ``Trainer(..., callbacks=[pruning_callback(pruner)])``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.pruned_linear import PrunedLinear
from ..primitives.sparsity import check_sparsity, magnitude_mask


@dataclass(frozen=True)
class CubicSchedule:
    final_sparsity: float
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    initial_sparsity: float = 0.0

    def __post_init__(self):
        check_sparsity(self.final_sparsity, "final_sparsity")
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        for f in ("begin_step", "end_step", "frequency"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f, f"must be a non-negative integer, got {v!r}")
        if self.end_step <= self.begin_step:
            raise ConfigError("end_step", f"must be after begin_step ({self.begin_step}), got {self.end_step}")
        if self.frequency < 1:
            raise ConfigError("frequency", "must be at least 1")
        if self.initial_sparsity > self.final_sparsity:
            raise ConfigError("initial_sparsity", "must not exceed final_sparsity")

    def sparsity_at(self, step: int) -> float:
        """Target sparsity at ``step`` (held between updates: computed at the last update step)."""
        if step < self.begin_step:
            return 0.0
        if step >= self.end_step:
            return self.final_sparsity
        t = self.begin_step + ((step - self.begin_step) // self.frequency) * self.frequency
        frac = (t - self.begin_step) / (self.end_step - self.begin_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** 3

    def is_update(self, step: int) -> bool:
        return self.begin_step <= step and ((step - self.begin_step) % self.frequency == 0 or step == self.end_step)


class GradualPruner:
    """Wraps the chosen linears of ``model`` in PrunedLinear (in place) and prunes them on schedule."""

    def __init__(self, model: nn.Module, final_sparsity: float = 0.5, begin_step: int = 0, end_step: int = 1000,
                 frequency: int = 100, initial_sparsity: float = 0.0, *, targets: Iterable = (nn.Linear,),
                 ignore: Iterable | None = None):
        from ..prune.apply import install, prunable

        self.schedule = CubicSchedule(final_sparsity, begin_step, end_step, frequency, initial_sparsity)
        ignore = ("lm_head", "re:.*embed.*") if ignore is None else ignore
        self.layers: dict[str, PrunedLinear] = {}
        for name, lin in prunable(model, targets, ignore).items():
            mod = lin if isinstance(lin, PrunedLinear) else install(model, name, lin, torch.ones_like(lin.weight, dtype=torch.bool))
            self.layers[name] = mod
        self.current = 0.0

    @torch.no_grad()
    def step(self, step: int) -> float | None:
        """Call after the optimizer step with the number of finished steps; returns the new sparsity on updates."""
        if not self.schedule.is_update(step):
            return None
        target = self.schedule.sparsity_at(step)
        if target <= self.current:
            return None
        for name, m in self.layers.items():
            score = (m.weight.detach().float() * m.mask).abs()  # pruned weights score 0: pruned first again
            keep = magnitude_mask(score, target, name=f"{name}.weight")
            m.set_mask(keep & m.mask)
        self.current = target
        return target

    def sparsity(self) -> float:
        total = sum(m.mask.numel() for m in self.layers.values())
        return sum(m.pruned_count() for m in self.layers.values()) / max(total, 1)


def pruning_callback(pruner: GradualPruner):
    """A ``transformers.TrainerCallback`` that calls ``pruner.step(state.global_step)`` after each step."""
    from transformers import TrainerCallback

    class GradualPruningCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            pruner.step(state.global_step)
            return control

    return GradualPruningCallback()
