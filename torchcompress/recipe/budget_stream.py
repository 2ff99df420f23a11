"""The budget stage on the streamed block pipeline (``compress_checkpoint``): a knapsack needs every
layer's error table before the first layer is quantized, so the stage starts with a float pass
over all blocks (sensitivity, read-only; skipped on a cache hit), solves the plan, then quantizes
in the main pass like any other stage (GPTQ on the compressed model's activations, RTN / GGUF blocks
from each layer's weights)."""

from __future__ import annotations

import hashlib

from ..errors import ConfigError
from ..pipeline.engine import BlockStep
from .schema import Stage
from .stage_runners import budget_recorder


def checkpoint_key(ckpt) -> str:
    """The cache key's model part for a checkpoint on disk: tensor names, shapes, dtypes and the
    shard files' names, sizes and modification times (reading every weight for a hash would double the I/O)."""
    h = hashlib.sha256()
    for name in sorted(ckpt.tensors):
        i = ckpt.tensors[name]
        st = i.file.stat()
        h.update(f"{name}:{i.shape}:{i.dtype}:{i.file.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def plan_budget_stage(stage: Stage, records: list, plan_cls):
    """A ``_Plan`` whose ``float_pass(fp)`` measures, solves, and sets up the per-block step."""
    from ..quant.budget import planner_for

    cfg = stage.config
    losses: dict = {}
    choice: dict = {}
    on_module = budget_recorder(stage, records, choice, losses)
    holder: dict = {}

    def apply(ctx):
        if "step" not in holder:
            raise RuntimeError("budget stage: the float pass did not run")
        holder["step"].apply(ctx)

    plan = plan_cls(stage, BlockStep(apply, needs_forward=cfg.method == "gptq", name=stage.name), None, records)

    def prepare(fp) -> None:
        planner = planner_for(fp.model, cfg, stage.targets, stage.ignore)  # a budget out of range fails here
        if fp.calib is None:
            raise ConfigError("calib_data", "the budget search needs calibration data (--calib) for its layer errors")
        key = planner.cache_key(checkpoint_key(fp.ckpt), fp.calib_all)
        if not planner.load_cache(key):
            fp.run([planner.sensitivity_step()])
            planner.save_cache(key)
        solved = planner.solve()
        choice.update(solved.choice)
        holder["step"] = planner.apply_step(on_module, losses.__setitem__)

    plan.float_pass = prepare
    return plan
