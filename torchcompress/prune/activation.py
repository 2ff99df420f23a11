"""Activation statistics from forward hooks over calibration data, and budgeted per-layer rates.

``input_norms`` runs the whole model on the calibration batches with removable forward hooks on the
given linears and returns, per linear, the L2 norm of each input feature over the real (unmasked)
tokens: ``||X_j||_2``. ``adaptive_counts`` turns per-layer channel scores into per-layer prune
counts under one global budget: scores are divided by their layer's mean (so layers are comparable),
ranked together, and the lowest are pruned, at most ``cap`` of a layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NumericError


@torch.no_grad()
def input_norms(model: nn.Module, linears: dict[str, nn.Module], calib, batch_size: int = 8) -> dict[str, torch.Tensor]:
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    state = {"mask": None}

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach()
            mask = state["mask"]
            x = x[mask.to(x.device)] if mask is not None and mask.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            sums[name] += x.float().pow(2).sum(0).double().cpu()
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    dev = next(model.parameters()).device
    try:
        for ids, mask in calib.batches(batch_size):
            state["mask"] = mask.bool()
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, s in sums.items():
        if not bool(torch.isfinite(s).all()):
            raise NumericError(f"{n} inputs", "calibration activations hold NaN/Inf values")
        out[n] = s.sqrt().float()
    return out


def adaptive_counts(scores: list[torch.Tensor], ratio: float, cap: float) -> list[int]:
    """How many channels each layer prunes: ``round(ratio * total)`` in all, at most
    ``floor(cap * size)`` per layer, chosen by globally ranked mean-normalized scores."""
    sizes = [s.numel() for s in scores]
    total = int(round(ratio * sum(sizes)))
    limit = [int(cap * n) for n in sizes]
    norm = torch.cat([s.float() / s.float().mean().clamp_min(1e-30) for s in scores])
    layer = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    counts = [0] * len(sizes)
    left = total
    for idx in torch.argsort(norm, stable=True).tolist():
        if left == 0:
            break
        li = int(layer[idx])
        if counts[li] < limit[li]:
            counts[li] += 1
            left -= 1
    return counts
