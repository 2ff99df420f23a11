"""The block loop: every stage acts on one decoder block at a time.

A :class:`BlockStep` is a stage's per-block callback (``apply(ctx)``, where ``ctx`` is a
:class:`~.context.BlockContext`). :func:`run_blocks` walks the blocks: bring block ``b`` to the
execution device (``load``), let every step act on it, run the calibration batches through the
compressed block to get the next block's inputs, hand the block to ``finish`` (write it, record
resume state, free it). :func:`run_in_memory` is the same loop over a model that is already in
memory (the Python API's verbs), with per-block resume state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .context import BlockContext, BlockInputs, capture_inputs
from .skeleton import find_blocks

log = logging.getLogger(__name__)


@dataclass
class BlockStep:
    """A stage's work on one block. ``needs_forward``: it reads calibration activations.
    ``propagate_original``: the next block must see this block's *uncompressed* outputs (statistics
    of the original model, e.g. activation-aware SVD)."""

    apply: Callable[[BlockContext], None]
    needs_forward: bool = True
    propagate_original: bool = False
    name: str = ""


def run_blocks(prefix: str, blocks, steps: list[BlockStep], inputs: BlockInputs | None, device, *, start: int = 0,
               load: Callable | None = None, finish: Callable | None = None,
               on_block: Callable[[int, int], None] | None = None) -> None:
    """Apply ``steps`` to ``blocks[start:]`` in order; ``inputs`` (None for data-free steps) enter ``blocks[start]``."""
    n = len(blocks)
    for b in range(start, n):
        block = blocks[b]
        if load is not None:
            block = load(b, block) or block
        ctx = BlockContext(block, f"{prefix}.{b}.", inputs, device, b)
        with torch.no_grad():
            original = ctx.outputs() if inputs is not None and any(s.propagate_original for s in steps) else None
            for s in steps:
                s.apply(ctx)
            if inputs is not None:
                ctx.propagate(original)
        if finish is not None:
            finish(b, ctx.block, inputs)
        log.info("block %d/%d done", b + 1, n)
        if on_block is not None:
            on_block(b, n)


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def run_in_memory(model: nn.Module, steps: list[BlockStep], calib, *, batch_size: int = 8, state=None,
                  offload_dir=None, on_block=None, restore: Callable | None = None) -> None:
    """:func:`run_blocks` over the decoder blocks of an in-memory transformers model.

    ``state``: a :class:`~torchcompress.calibration.resume.BlockState`; its finished blocks are put
    back by ``restore(b, modules)`` and the run continues after them with the saved activations."""
    from ..calibration.offload import store_from

    prefix, blocks = find_blocks(model)
    dev = model_device(model)
    inputs = None
    if any(s.needs_forward for s in steps):
        inputs = capture_inputs(model, blocks, calib.batches(batch_size), dev, offload_dir=offload_dir, keep_on="cpu")
    start = 0
    if state is not None and state.done:
        log.info("resuming after block %d/%d from %s", state.done, len(blocks), state.dir)
        for b in range(state.done):
            restore(b, state.load_block(b))
        start = state.done
        if inputs is not None:
            inputs.hidden.close()
            inputs.hidden = store_from(state.load_inputs(), offload_dir)

    def finish(b, block, inp):
        if state is not None:
            state.save_block(b, state_modules(block), inp.hidden if inp is not None else [])

    try:
        run_blocks(prefix, blocks, steps, inputs, dev, start=start, finish=finish, on_block=on_block)
    finally:
        if inputs is not None:
            inputs.hidden.close()


def state_modules(block: nn.Module) -> dict[str, nn.Module]:
    """The compressed modules of a block (the ones the checkpoint manifest knows), by name in the block."""
    from ..formats.checkpoint import compressed_modules

    return {n: block.get_submodule(n) for n in compressed_modules(block) if n}
