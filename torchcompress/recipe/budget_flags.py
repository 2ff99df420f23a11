"""``compress --target-bpw`` / ``--target-size``: put a size budget on a recipe.

A recipe with ``kind: budget`` stages gets the new target on each; a recipe with exactly one ``rtn``,
``gptq`` or ``gguf`` stage has it turned into a ``budget`` stage of that method (its scheme's
symmetry and scale dtype, GPTQ's options and the stage's targets/ignore carried over). Anything else
is refused by name.
"""

from __future__ import annotations

import dataclasses

from ..config import GPTQConfig, RTNConfig
from ..errors import InputError
from ..quant.budget_config import BudgetConfig
from ..quant.gguf_config import GGUFConfig
from .schema import Recipe, Stage


def with_budget(recipe: Recipe, target_bpw: float | None = None, target_size: str | None = None) -> Recipe:
    if target_bpw is None and target_size is None:
        return recipe
    flag = "--target-bpw" if target_bpw is not None else "--target-size"
    target = {"target_bpw": target_bpw, "target_size": target_size}
    try:
        BudgetConfig(**target)  # a bad value fails here, before the model loads
    except InputError as e:
        raise InputError(f"{flag}: {str(e).split(': ', 1)[-1]}") from None
    if any(isinstance(s.config, BudgetConfig) for s in recipe.stages):
        stages = tuple(dataclasses.replace(s, config=dataclasses.replace(s.config, **target))
                       if isinstance(s.config, BudgetConfig) else s for s in recipe.stages)
        return dataclasses.replace(recipe, stages=stages)
    quant = [i for i, s in enumerate(recipe.stages) if type(s.config) in (RTNConfig, GPTQConfig, GGUFConfig)]
    if len(quant) != 1:
        raise InputError(f"{flag}: recipe {recipe.name!r} has {len(quant)} rtn/gptq/gguf stages; a size budget "
                         "needs exactly one (or a kind: budget stage)")
    i = quant[0]
    s = recipe.stages[i]
    cfg = s.config
    if isinstance(cfg, GGUFConfig):
        new = BudgetConfig(**target, method="gguf")
    else:
        extra = {}
        if isinstance(cfg, GPTQConfig):
            extra = dict(damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order,
                         static_groups=cfg.static_groups)
        new = BudgetConfig(**target, method="gptq" if isinstance(cfg, GPTQConfig) else "rtn",
                           symmetric=cfg.scheme.symmetric, scale_dtype=cfg.scheme.scale_dtype, **extra)
    ignore = s.ignore if s.ignore is not None else None
    stage = Stage(kind="budget", name=f"{s.name}-budget", config=new, targets=s.targets, ignore=ignore)
    stages = recipe.stages[:i] + (stage,) + recipe.stages[i + 1:]
    return dataclasses.replace(recipe, stages=stages, name=f"{recipe.name}@{flag[2:]}={target_bpw or target_size}")
