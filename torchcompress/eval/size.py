"""Sizes: bytes of a model's tensors, bytes on disk, bits per weight of compressed layers."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch.nn as nn


def _unique_tensors(model: nn.Module):
    seen = set()
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if not t.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        yield name, t


def _persistent_buffer_names(model: nn.Module) -> set:
    return set(model.state_dict().keys())


def _mask_bytes(model: nn.Module) -> int:
    """Bytes of the pruning masks a checkpoint holds beyond the module tensors (packed bits, if any)."""
    from ..nn.pruned_linear import PrunedLinear

    return sum(m.stored_mask_bytes() for m in model.modules() if isinstance(m, PrunedLinear)
               and m.mask_storage_now() != "bool")


def model_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint of ``model`` stores (persistent, tied tensors counted once).

    A pruned layer counts as its dense weight (its zeros stored as zeros) plus the mask only where the
    checkpoint needs one (packed bits); see :func:`sparse_bytes` for a sparse format's size."""
    keep = _persistent_buffer_names(model)
    return sum(t.numel() * t.element_size() for n, t in _unique_tensors(model) if n in keep) + _mask_bytes(model)


def sparse_bytes(model: nn.Module) -> int | None:
    """Bytes of the model with its 2:4-pruned Linears in compressed-tensors' ``sparse-24-bitmask``
    layout (the kept values, (N, K/2) in the weight dtype, plus a bitmask of (N, ceil(K/8)) bytes);
    None when no layer is 2:4-pruned (unstructured sparsity has no sparse format written here)."""
    from ..nn.pruned_linear import PrunedLinear

    layers = [m for m in model.modules() if isinstance(m, PrunedLinear) and m.nm == (2, 4) and m.in_features % 4 == 0]
    if not layers:
        return None
    total = model_bytes(model)
    for m in layers:
        n, k, elt = m.out_features, m.in_features, m.weight.element_size()
        total += n * (k // 2) * elt + n * (-(-k // 8)) - n * k * elt - m.stored_mask_bytes()
    return total


def bytes_by_module_type(model: nn.Module) -> dict[str, int]:
    """Bytes of directly-owned persistent tensors grouped by module class name (for reports)."""
    keep = _persistent_buffer_names(model)
    owner = {}
    for mod_name, mod in model.named_modules():
        for t_name, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            owner[f"{mod_name}.{t_name}" if mod_name else t_name] = type(mod).__name__
    out: dict[str, int] = defaultdict(int)
    for name, t in _unique_tensors(model):
        if name in keep:
            out[owner.get(name, "other")] += t.numel() * t.element_size()
    return dict(out)


def dir_bytes(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def linear_weight_count(model: nn.Module) -> int:
    from ..nn.quant_linear import QuantLinear

    n = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, QuantLinear)):
            n += m.in_features * m.out_features
    return n
