"""A recipe over a safetensors checkpoint, one decoder block at a time: the memory of one block.

    report = compress_checkpoint("path/to/llama-8b", load_recipe("w4-rtn"), "out/llama-8b-w4")

The model is a skeleton on the meta device. Calibration inputs of the first block come from the
embeddings alone; then for each decoder block: read its tensors from the shards, move it to the
execution device, let every stage of the recipe act on it (data-free stages directly, calibrated
ones on the activations through it), run the activations through the compressed block for the next
one, write the block's shard, free it. Modules outside the blocks (embeddings, final norm, output
head) are written last, one per shard. A killed run continues after its last written block
(``resume``); the output directory appears whole at the end (:class:`~..pipeline.writer.ShardWriter`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..config import GPTQConfig, HQQConfig, QATConfig, RTNConfig
from ..errors import InputError, RecipeError
from ..formats.checkpoint import compressed_modules
from ..ignore import DEFAULT_IGNORE
from ..pipeline.context import capture_inputs
from ..pipeline.engine import BlockStep, run_blocks
from ..pipeline.shards import Checkpoint
from ..pipeline.skeleton import (Prefetcher, assign_state, build_skeleton, find_blocks, materialize, release,
                                 tied_sources)
from ..pipeline.view import block_view, modules_view
from ..records import LayerRecord, StageRecord
from ..telemetry.memory import PeakMemory
from .runner import Report, check_composes
from .stage_runners import record_quant
from .schema import Recipe, Stage

log = logging.getLogger(__name__)


class _Plan:
    """One recipe stage on the pipeline: its per-block step and what it does outside the blocks."""

    def __init__(self, stage: Stage, step: BlockStep, rest: Callable[[nn.Module], None] | None, records: list):
        self.stage, self.step, self.rest, self.records = stage, step, rest, records
        self.seconds = 0.0
        # a stage that changes the residual stream (rotation): ``prepare(view)`` updates the embedding
        # that captures block 0's inputs; ``unties``: the head gets its own tensor (tied models untied)
        self.prepare: Callable[[nn.Module], None] | None = None
        self.unties = False
        self.float_pass: Callable | None = None  # called with a _FloatPass before the main pass (budget search)
        self.memory = PeakMemory()  # the stage's peak host (and device) memory over its blocks
        inner = step.apply

        def timed(ctx):
            t0 = time.perf_counter()
            with self.memory:
                inner(ctx)
            self.seconds += time.perf_counter() - t0

        step.apply = timed


def _data_free(stage: Stage, runner: Callable, records: list) -> tuple[BlockStep, Callable]:
    """A stage that changes each module from its own weights: run it on the block's view."""
    def apply(ctx):
        runner(block_view(ctx.prefix, ctx.block), stage, records, None)

    def rest(view):  # the embeddings, norm and head: only when the stage's targets pick one of them
        from ..targets import select_modules

        ignore = DEFAULT_IGNORE if stage.ignore is None else stage.ignore
        if any(isinstance(m, nn.Linear) for _, m in select_modules(view, stage.targets, ignore)):
            runner(view, stage, records, None)

    return BlockStep(apply, needs_forward=False, name=stage.name), rest


class _FloatPass:
    """Read-only passes of calibration data through the float checkpoint's blocks (a stage's
    ``float_pass``: statistics of the whole model before the main pass changes any block)."""

    def __init__(self, model, prefix, blocks, outside, ckpt, dtype, device, calib, calib_all, batch_size, offload_dir):
        self.model, self.prefix, self.blocks, self.outside = model, prefix, blocks, outside
        self.ckpt, self.dtype, self.device, self.calib, self.calib_all = ckpt, dtype, device, calib, calib_all
        self.batch_size, self.offload_dir = batch_size, offload_dir

    def run(self, steps: list[BlockStep]) -> None:
        model, device = self.model, self.device
        for name in self.outside:
            if not name.endswith("lm_head"):
                materialize(model, name, self.ckpt, self.dtype, device)
        inputs = capture_inputs(model, self.blocks, self.calib.batches(self.batch_size), device,
                                offload_dir=self.offload_dir, keep_on="cpu")
        for name in self.outside:
            release(model.get_submodule(name))
        names = [f"{self.prefix}.{b}" for b in range(len(self.blocks))]
        prefetch = Prefetcher(model, names, self.ckpt, self.dtype)
        try:
            run_blocks(self.prefix, self.blocks, steps, inputs, device,
                       load=lambda b, block: assign_state(model, names[b], prefetch.get(b), device),
                       finish=lambda b, block, inp: release(block))
        finally:
            prefetch.close()
            inputs.hidden.close()


def _plan_stage(stage: Stage, n_layers: int, records: list, model: nn.Module | None = None) -> _Plan:
    from ..prune.config import MagnitudePruneConfig, SparseGPTConfig, WandaConfig
    from ..quant.budget_config import BudgetConfig
    from ..quant.gguf_config import GGUFConfig

    from ..quant.rotation import RotateConfig

    cfg = stage.config
    if isinstance(cfg, BudgetConfig):  # mixed precision under a size budget: prepares with a float pass
        from .budget_stream import plan_budget_stage

        return plan_budget_stage(stage, records, _Plan)
    ignore = DEFAULT_IGNORE if stage.ignore is None else stage.ignore
    if isinstance(cfg, RotateConfig):  # data-free per block; embedding (before the capture), norm and head outside
        from ..quant.rotation import rotation_plan
        from .stage_runners import record_rotation

        step, rest, prepare = rotation_plan(cfg, model, record_rotation(stage, records))
        plan = _Plan(stage, step, rest, records)
        plan.prepare, plan.unties = prepare, True
        return plan
    if type(cfg) in (RTNConfig, QATConfig, HQQConfig):  # quantize_ verbs: each module from its own weights
        from .stage_runners import run_quantize as runner

        return _Plan(stage, *_data_free(stage, runner, records), records)
    if isinstance(cfg, GPTQConfig):
        from ..quant.gptq import gptq_step

        losses: dict = {}
        step = gptq_step(cfg, stage.targets, ignore, on_module=record_quant(stage, records, losses),
                         on_loss=losses.__setitem__)
        return _Plan(stage, step, None, records)
    from ..quant.autoround_config import AutoRoundConfig

    if isinstance(cfg, AutoRoundConfig):
        from ..quant.autoround import autoround_step

        return _Plan(stage, autoround_step(cfg, stage.targets, ignore, on_module=record_quant(stage, records)), None, records)
    if isinstance(cfg, GGUFConfig) and not cfg.imatrix:
        from ..quant.gguf import gguf_planner, quantize_gguf_

        planner = gguf_planner(cfg, n_layers, model)  # one per stage: llama.cpp's rules count layers across blocks

        def run(view, stage=stage):
            quantize_gguf_(view, cfg, targets=stage.targets, ignore=stage.ignore, on_module=record_quant(stage, records),
                           planner=planner)

        def rest(view):  # embeddings / norm / head: only when the stage picks one (lm_head is in llama.cpp's mix)
            from ..targets import select_modules

            ignore_ = ("re:.*embed.*",) if stage.ignore is None else stage.ignore
            if any(type(m) is nn.Linear for _, m in select_modules(view, stage.targets, ignore_)):
                run(view)

        return _Plan(stage, BlockStep(lambda ctx: run(block_view(ctx.prefix, ctx.block)), needs_forward=False), rest, records)
    if isinstance(cfg, MagnitudePruneConfig) and cfg.scope == "layer":
        from ..prune.stages import run_prune_stage

        return _Plan(stage, *_data_free(stage, run_prune_stage, records), records)
    if isinstance(cfg, (WandaConfig, SparseGPTConfig)):
        from ..prune.apply import prunable
        from ..prune.sequential import prune_step
        from ..prune.stages import prune_recorder

        def select(block, prefix):
            return {n[len(prefix):]: m for n, m in prunable(block_view(prefix, block), stage.targets, ignore).items()}

        return _Plan(stage, prune_step(cfg, select, on_module=prune_recorder(stage, records)), None, records)
    from ..quant.awq_config import AWQConfig

    if isinstance(cfg, AWQConfig):
        from ..quant.awq import awq_step
        from .stage_runners import record_awq

        return _Plan(stage, awq_step(cfg, record_awq(stage, records)), None, records)
    from ..lowrank.config import SVDConfig

    if isinstance(cfg, SVDConfig) and cfg.allocation != "global":
        from ..lowrank.stages import svd_recorder
        from ..lowrank.svd import svd_step

        svd_ignore = ("lm_head", "re:.*embed.*") if stage.ignore is None else stage.ignore
        return _Plan(stage, svd_step(cfg, stage.targets, svd_ignore, on_module=svd_recorder(stage, records)), None, records)
    raise RecipeError(f"stage {stage.name!r} ({stage.kind}) does not run on the block pipeline (it needs the whole "
                      "model at once)", "recipe")


def streamable(recipe: Recipe) -> str | None:
    """None when every stage of ``recipe`` runs on the block pipeline, else the reason it cannot."""
    try:
        _check_rotation_first(recipe)
        for s in recipe.stages:
            _plan_stage(s, 1, [])
    except RecipeError as e:
        return str(e)
    return None


def _check_rotation_first(recipe: Recipe) -> None:
    """A rotation streams only as the first stage: its embedding feeds every later stage's capture."""
    from ..quant.rotation import RotateConfig

    for i, s in enumerate(recipe.stages):
        if i and isinstance(s.config, RotateConfig):
            raise RecipeError(f"stage {s.name!r} (rotate) must be the first stage to run on the block pipeline "
                              "(the stages before it would see the unrotated stream)", recipe.source)


def _fingerprint(ckpt: Checkpoint, recipe: Recipe, calib, dtype, extra: str) -> str:
    h = hashlib.sha256()
    for part in (repr(recipe.stages), str(dtype), extra, calib.sha256() if calib is not None else "-"):
        h.update(str(part).encode() + b"\0")
    for name in sorted(ckpt.tensors):
        info = ckpt.tensors[name]
        h.update(f"{name}:{info.file.name}:{info.shape}:{info.dtype}:{info.file.stat().st_size}".encode())
    return h.hexdigest()


def shard_for_rank(calib, batch_size: int):
    """Under ``torch.distributed``, this rank's contiguous share of the calibration samples, cut at
    batch boundaries: every rank runs whole batches of the one-process run, so the statistics summed
    across ranks add the very float32 batch terms the one-process run adds."""
    d = torch.distributed
    if calib is None or not (d.is_available() and d.is_initialized()) or d.get_world_size() == 1:
        return calib
    from ..calibration.data import CalibrationSet

    rank, world = d.get_rank(), d.get_world_size()
    n_batches = -(-calib.input_ids.shape[0] // batch_size)
    if n_batches < world:
        from ..errors import ConfigError

        raise ConfigError("calib_samples", f"{calib.input_ids.shape[0]} samples make {n_batches} batches of {batch_size}; "
                          f"{world} processes need at least one batch each")
    first, last = rank * n_batches // world, (rank + 1) * n_batches // world  # whole batches, as even as can be
    lo, hi = first * batch_size, min(last * batch_size, calib.input_ids.shape[0])
    return CalibrationSet(calib.input_ids[lo:hi], calib.attention_mask[lo:hi])


def _outside_modules(model: nn.Module, blocks_prefix: str) -> list[str]:
    """Top-most modules outside the decoder blocks that hold tensors of the checkpoint, in order."""
    out = []
    for name, m in model.named_modules():
        if not name or name == blocks_prefix or name.startswith(blocks_prefix + ".") or blocks_prefix.startswith(name + "."):
            continue
        if any(name.startswith(o + ".") for o in out):
            continue
        if any(True for _ in m.parameters(recurse=True)) or any(True for _ in m.buffers(recurse=True)):
            if list(m.state_dict().keys()):
                out.append(name)
    return out


def _cpu_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": t.detach().contiguous().cpu() for k, t in module.state_dict().items()}


@torch.no_grad()
def compress_checkpoint(src, recipe: Recipe, out, *, calib=None, device=torch.device("cpu"),
                        dtype: torch.dtype = torch.float32, tokenizer=None, resume: bool = False, offload_dir=None,
                        batch_size: int = 8, extra_files=None,
                        on_block: Callable[[int, int], None] | None = None, on_stage: Callable | None = None,
                        fingerprint_extra: str = "") -> Report:
    """Apply ``recipe`` to the checkpoint directory ``src`` block by block and write ``out``."""
    from ..formats.checkpoint import FORMAT_VERSION, QUANT_METHOD, standard_format_reason, write_hf_files
    from ..pipeline.writer import ShardWriter

    ckpt = src if isinstance(src, Checkpoint) else Checkpoint.open(src)
    model = build_skeleton(ckpt, dtype)
    prefix, blocks = find_blocks(model)
    _check_rotation_first(recipe)
    plans = [_plan_stage(s, len(blocks), [], model) for s in recipe.stages]
    untie = any(p.unties for p in plans)
    steps = [p.step for p in plans]
    needs_forward = any(s.needs_forward for s in steps)
    if needs_forward and calib is None:
        from ..errors import ConfigError

        raise ConfigError("calib_data", "this recipe needs calibration data (--calib)")
    fingerprint = _fingerprint(ckpt, recipe, calib, dtype, fingerprint_extra)  # of all ranks' data together
    calib_all = calib
    calib = shard_for_rank(calib, batch_size)
    outside = _outside_modules(model, prefix)
    total = len(blocks) + len(outside)
    writer = ShardWriter(out, total, fingerprint, resume)
    try:
        before = sum(i.nbytes // i.dtype.itemsize * (dtype.itemsize if i.dtype.is_floating_point else i.dtype.itemsize)
                     for i in ckpt.tensors.values())  # at the compute dtype, as the in-memory path counts
        report = Report(recipe=recipe.name, size_bytes_before=before, size_bytes_after=0)
        from ..telemetry.run import for_run

        tel = for_run(recipe)  # spans run > stage > layer, metrics; no-op when off
        with tel.run(report, calib):
            done = writer.done_blocks
            for p in plans:  # what finished blocks recorded before a kill
                p.records.extend(LayerRecord(**r) for r in writer.extra.get("records", {}).get(p.stage.name, []))
                p.seconds = writer.extra.get("seconds", {}).get(p.stage.name, 0.0)
                p.memory = PeakMemory(device)
                p.memory.merge(**writer.extra.get("memory", {}).get(p.stage.name, {}))
            for p in plans:  # stages that need the whole float model first (the budget search)
                if p.float_pass is not None:
                    t0 = time.perf_counter()
                    with p.memory:
                        p.float_pass(_FloatPass(model, prefix, blocks, outside, ckpt, dtype, device, calib, calib_all,
                                             batch_size, offload_dir))
                    p.seconds += time.perf_counter() - t0
            inputs = None
            if needs_forward:
                captured = [name for name in outside if not name.endswith("lm_head")]
                for name in captured:
                    materialize(model, name, ckpt, dtype, device)
                for p in plans:  # a rotation: block 0's inputs come from the rotated embedding
                    if p.prepare is not None:
                        p.prepare(modules_view(model, captured))
                # on the host (or disk): one batch at a time goes to the device, so device memory is one block
                # + its statistics + one batch, whatever the calibration set's size
                inputs = capture_inputs(model, blocks, calib.batches(batch_size), device, offload_dir=offload_dir,
                                        keep_on="cpu")
                for name in outside:
                    release(model.get_submodule(name))
                if done:
                    inputs.hidden.close()
                    from ..calibration.offload import store_from

                    inputs.hidden = store_from(writer.saved_inputs(), offload_dir)

            names = [f"{prefix}.{b}" for b in range(len(blocks))]
            prefetch = Prefetcher(model, names, ckpt, dtype)

            by_type = writer.extra.setdefault("bytes_by_type", {"before": {}, "after": {}})

            def count(which: str, module: nn.Module) -> None:
                from ..eval.size import bytes_by_module_type

                for k, v in bytes_by_module_type(module).items():
                    by_type[which][k] = by_type[which].get(k, 0) + v

            def load(b, block):
                block = assign_state(model, names[b], prefetch.get(b), device)
                count("before", block)
                return block

            def finish(b, block, inp):
                count("after", block)
                writer.write_shard(b, _cpu_state(block, f"{prefix}.{b}."), compressed_modules(block, f"{prefix}.{b}."))
                writer.extra["records"] = {p.stage.name: [r.__dict__ for r in p.records] for p in plans}
                writer.extra["seconds"] = {p.stage.name: p.seconds for p in plans}
                writer.extra["memory"] = {p.stage.name: {"peak_rss": p.memory.peak_rss_bytes,
                                                         "peak_cuda": p.memory.peak_cuda_bytes} for p in plans}
                writer.block_done(b, inp.hidden if inp is not None else None)
                release(block)

            try:
                run_blocks(prefix, blocks, steps, inputs, device, start=done, load=load, finish=finish, on_block=on_block)
            finally:
                prefetch.close()
                if inputs is not None:
                    inputs.hidden.close()
            tied = {}
            for i, name in enumerate(outside):
                keys = [f"{name}.{k}" for k in model.get_submodule(name).state_dict()]
                tied_copy = bool(keys) and all(k in tied_sources(model) and k not in ckpt.tensors for k in keys)
                mod = materialize(model, name, ckpt, dtype, device)
                if not tied_copy:  # a tied head shares the embedding's bytes: counted once, as in memory
                    count("before", mod)
                view = modules_view(model, [name])
                for p in plans:
                    if p.rest is not None:
                        t0 = time.perf_counter()
                        with p.memory:
                            p.rest(view)
                        p.seconds += time.perf_counter() - t0
                new = view.get_submodule(name)
                if new is not model.get_submodule(name):
                    from ..targets import set_submodule

                    set_submodule(model, name, new)
                if not (tied_copy and new is mod) or untie:  # an untied head counts on its own
                    count("after", new)
                state = _cpu_state(new, f"{name}.")
                for key in list(state):  # a tied copy (lm_head = embed_tokens) is written once
                    src_key = tied_sources(model).get(key)
                    if (src_key is not None and src_key in writer.state["weight_map"] and key not in ckpt.tensors
                            and not untie):
                        tied[key] = src_key
                        del state[key]
                writer.write_shard(len(blocks) + i, state, compressed_modules(new, f"{name}."))
                release(new)
            for i, p in enumerate(plans):
                with tel.stage(i, p.stage, report.layers, memory=p.memory) as obs:  # the stage's layer records, in its span
                    obs.extend(p.records)
                rec = StageRecord(p.stage.name, p.stage.kind, p.seconds, len(p.records), p.memory.peak_rss_bytes,
                                  p.memory.peak_cuda_bytes)
                if rec.modules == 0:
                    check_composes(recipe, p.stage, report.stages)
                    log.warning("stage %s (%s) changed no module: check its targets/ignore", p.stage.name, p.stage.kind)
                report.stages.append(rec)
                if on_stage is not None:
                    on_stage(rec)
            if untie and getattr(model.config, "tie_word_embeddings", False):
                model.config.tie_word_embeddings = False  # the head was written as its own tensor
            manifest = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                        "modules": writer.state["manifest"], "tied": tied}

            def files(d: Path):
                model.config.dtype = dtype
                qcfg = manifest
                if standard_format_reason(manifest) is None:  # compressed-tensors, converted shard by shard
                    from ..formats.ct_convert import convert_directory, ct_ignore

                    from ..pipeline.experts import disk_namer

                    rename = disk_namer(model)  # MoE: the family's on-disk names (Mixtral's block_sparse_moe)
                    groups = convert_directory(d, manifest["modules"], rename)
                    qcfg = groups.config(ct_ignore(model, set(manifest["modules"]), rename))
                write_hf_files(d, model, qcfg, tokenizer)
                files_ = extra_files(report) if callable(extra_files) else (extra_files or {})
                for name, data in files_.items():
                    (d / name).write_bytes(data)

            report.size_bytes_after = int(writer.state.get("tensor_bytes", 0))
            report.bytes_by_type_before, report.bytes_by_type_after = by_type["before"], by_type["after"]
            writer.finish(files)
            return report
    except InputError:
        writer.abort()  # bad input (a truncated shard, a NaN tensor) leaves no partial output behind
        raise

