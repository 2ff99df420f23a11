"""Perplexity (and KL / top-1 agreement against a reference) of a checkpoint on disk, one decoder
block at a time: every window goes through block ``i`` before any goes through ``i + 1``, so the
memory is one block plus the windows' hidden states, never the model.

Works on a transformers directory (sharded or not) and on a ``compress`` output (its compressed
modules are rebuilt from the manifest on the meta device and filled block by block).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..pipeline.context import BlockContext, capture_inputs
from ..pipeline.shards import Checkpoint
from ..pipeline.skeleton import build_skeleton, find_blocks, materialize, release, tied_sources
from .perplexity import EvalResult, TextWindows


def streamed_skeleton(directory, dtype: torch.dtype) -> tuple[nn.Module, Checkpoint]:
    """The model of ``directory`` on the meta device (compressed modules from its manifest)."""
    from ..formats.checkpoint import apply_manifest, module_manifest, read_manifest

    ckpt = Checkpoint.open(directory)
    model = build_skeleton(ckpt, dtype)
    manifest = read_manifest(Path(directory))
    if manifest is not None:
        manifest = module_manifest(model, manifest)  # a MoE family's on-disk names -> module names
        apply_manifest(model, manifest, device="meta", source=str(directory))
        tied = tied_sources(model)
        tied.update({str(k): str(v) for k, v in (manifest.get("tied") or {}).items()})
    return model, ckpt


@torch.no_grad()
def final_hidden(directory, windows: TextWindows, device, dtype: torch.dtype, batch_size: int = 4, progress=None):
    """(model skeleton, checkpoint, prefix, hidden states after the last block, one per batch)."""
    model, ckpt = streamed_skeleton(directory, dtype)
    prefix, blocks = find_blocks(model)
    outside = [n for n, m in model.named_children()]  # materialize what runs before the first block
    base = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    pre = [n for n, m in (model.get_submodule(base) if base else model).named_children()
           if f"{base}.{n}".lstrip(".") != prefix]
    pre = [f"{base}.{n}".lstrip(".") for n in pre]
    for name in pre:
        materialize(model, name, ckpt, dtype, device)
    ones = [(ids, torch.ones_like(ids)) for ids in windows.ids.split(batch_size)]
    inputs = capture_inputs(model, blocks, ones, device)
    for b in range(len(blocks)):
        block = materialize(model, f"{prefix}.{b}", ckpt, dtype, device)
        BlockContext(block, f"{prefix}.{b}.", inputs, device, b).propagate()
        release(block)
        if progress is not None:
            progress(b, len(blocks))
    del outside
    return model, ckpt, base, [inputs.hidden[i] for i in range(len(inputs))]


def _head(model: nn.Module, ckpt: Checkpoint, base: str, dtype, device):
    """The final norm and output head of ``model``, materialized: hidden -> float32 logits."""
    norm_name = f"{base}.norm".lstrip(".")
    materialize(model, norm_name, ckpt, dtype, device)
    head_name = "lm_head"
    materialize(model, head_name, ckpt, dtype, device)
    norm, head = model.get_submodule(norm_name), model.get_submodule(head_name)
    cap = getattr(model.config, "final_logit_softcapping", None)

    def logits(h):
        out = head(norm(h)).float()
        return torch.tanh(out / cap) * cap if cap else out

    return logits


@torch.no_grad()
def evaluate_streaming(directory, windows: TextWindows, *, ref_dir=None, device="cpu", dtype=torch.float32,
                       batch_size: int = 4, progress=None) -> EvalResult:
    """:func:`~.perplexity.evaluate` of the checkpoint ``directory`` (and ``ref_dir``) streamed by block."""
    runs = []
    for d in [directory] + ([ref_dir] if ref_dir is not None else []):
        model, ckpt, base, hidden = final_hidden(d, windows, device, dtype, batch_size, progress)
        runs.append((_head(model, ckpt, base, dtype, device), hidden))
    nll = nll_ref = kl = 0.0
    agree = count = 0
    ids_all = windows.ids.split(batch_size)
    for j, ids_b in enumerate(ids_all):
        for w in range(ids_b.shape[0]):  # one window at a time: (L, vocab) logits, never (W, L, vocab)
            ids = ids_b[w: w + 1].to(device)
            target = ids[:, 1:]
            logp = F.log_softmax(runs[0][0](runs[0][1][j][w: w + 1].to(device))[:, :-1], dim=-1)
            nll -= float(logp.gather(-1, target.unsqueeze(-1)).sum())
            count += target.numel()
            if len(runs) > 1:
                logq = F.log_softmax(runs[1][0](runs[1][1][j][w: w + 1].to(device))[:, :-1], dim=-1)
                nll_ref -= float(logq.gather(-1, target.unsqueeze(-1)).sum())
                kl += float((logq.exp() * (logq - logp)).sum())
                agree += int((logq.argmax(-1) == logp.argmax(-1)).sum())
    res = EvalResult(math.exp(nll / count), count, windows.ids.shape[0], windows.ids.shape[1])
    if len(runs) > 1:
        res.kl_divergence = kl / count
        res.top1_agreement = agree / count
        res.perplexity_ref = math.exp(nll_ref / count)
    return res
