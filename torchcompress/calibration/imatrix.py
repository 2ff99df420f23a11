"""Importance matrix (llama.cpp's imatrix): the mean squared activation of each input column of every
linear layer over calibration text, as ``llama-imatrix`` collects it for ``quant_weights``.

    >>> from torchcompress.calibration.imatrix import compute_imatrix
    >>> imat = compute_imatrix(model, calib)           # {"model.layers.0.mlp.down_proj": (1536,), ...}
    >>> export_gguf(model, tok, "m.gguf", "Q4_K_M", importance=imat)

Only real tokens count (``attention_mask`` 1). Values are float32 sums of squares in float64, divided
by the token count: ``imat[j] = mean_t x[t, j]^2``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

log = logging.getLogger(__name__)


@torch.no_grad()
def compute_imatrix(model: nn.Module, calib, batch_size: int = 4, include=None,
                    process_output: bool = False) -> dict[str, torch.Tensor]:
    """Per-column mean of squared inputs of every ``nn.Linear`` (or those ``include(name)`` accepts).

    The output head (``lm_head``) is left out unless ``process_output``, as ``llama-imatrix`` does
    by default (its ``--process-output``).

    ``calib``: a :class:`~torchcompress.calibration.CalibrationSet` (``batches`` of ids and mask).
    Returns ``{module name: (in_features,) float32}``.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and (include is None or include(n))
               and (process_output or n.rsplit(".", 1)[-1] != "lm_head")}
    if not linears:
        raise InputError("imatrix: the model has no nn.Linear layers to collect activations for")
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    counts = dict.fromkeys(linears, 0)
    state = {"mask": None}

    def hook(name):
        def fn(_mod, args):
            x = args[0]
            mask = state["mask"]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            sums[name] += (x * x).sum(0)
            counts[name] += x.shape[0]

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for ids, mask in calib.batches(batch_size):
            state["mask"] = mask.bool().to(device)
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for n in linears:
        if counts[n] == 0:
            log.warning("imatrix: %s saw no tokens; it is left out", n)
            continue
        out[n] = (sums[n] / counts[n]).to(torch.float32)
    return out


def save_imatrix(imat: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write an imatrix as safetensors (atomically)."""
    from safetensors.torch import save

    from ..formats.atomic import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in imat.items()}, metadata={"format": "torchcompress-imatrix"}))
    return Path(path)


def load_imatrix(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an imatrix written by :func:`save_imatrix`; checks every entry is a finite, non-negative vector."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise InputError(f"imatrix {p}: no such file")
    try:
        imat = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"imatrix {p}: not a readable safetensors file ({e})") from None
    for k, v in imat.items():
        if v.dim() != 1 or not v.is_floating_point() or not torch.isfinite(v).all() or (v < 0).any():
            raise InputError(f"imatrix {p}: entry {k!r} is not a finite non-negative vector")
    return {k: v.to(torch.float32) for k, v in imat.items()}


def imatrix_from_spec(spec: str, model, tokenizer, num_samples: int = 64, seq_len: int = 512) -> dict[str, torch.Tensor]:
    """``spec``: a ``.safetensors`` imatrix file, or calibration sources as for ``--calib``
    (``pydoc``, ``self``, a text file or glob, ``hf:NAME``...) to compute one from."""
    if str(spec).endswith(".safetensors"):
        return load_imatrix(spec)
    from .data import CalibrationConfig, build_calibration, parse_sources

    names, weights = parse_sources(spec)
    if tokenizer is None:
        raise InputError("imatrix: the model has no tokenizer; calibration text needs one")
    calib = build_calibration(CalibrationConfig(sources=names, weights=weights, num_samples=num_samples, seq_len=seq_len),
                              model, tokenizer)
    return compute_imatrix(model, calib)
