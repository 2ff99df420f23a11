"""2:4 sparse weights on NVIDIA GPUs: ``torch.sparse.to_sparse_semi_structured``.

Converts every :class:`PrunedLinear` with a 2:4 mask, on a CUDA device of compute capability >= 8.0
in float16/bfloat16, to a plain ``nn.Linear`` whose weight is a semi-structured sparse tensor
(the sparse tensor cores do the matmul). Anywhere else the layers stay masked dense and the
function says why, so the same code runs on every machine.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..nn.pruned_linear import PrunedLinear
from ..targets import set_submodule

log = logging.getLogger(__name__)


def semi_structured_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why 2:4 sparse kernels cannot run for ``device``/``dtype`` (None when they can)."""
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"compute capability {torch.cuda.get_device_capability(device)} < (8, 0)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (2:4 kernels take float16/bfloat16)"
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    return None


@torch.no_grad()
def to_semi_structured_(model: nn.Module) -> int:
    """Convert eligible 2:4 PrunedLinear layers in place; return how many were converted."""
    done, why = 0, set()
    for name, m in list(model.named_modules()):
        if not isinstance(m, PrunedLinear) or m.nm != (2, 4):
            continue
        reason = semi_structured_unavailable(m.weight.device, m.weight.dtype)
        if reason is not None:
            why.add(reason)
            continue
        from torch.sparse import to_sparse_semi_structured

        dense = m.make_permanent()
        try:
            dense.weight = nn.Parameter(to_sparse_semi_structured(dense.weight.detach()), requires_grad=False)
        except (RuntimeError, ValueError) as e:  # shape limits of the kernels (e.g. minimum sizes)
            why.add(f"{name}: {e}")
            continue
        set_submodule(model, name, dense)
        done += 1
    if why:
        log.info("2:4 layers left masked dense: %s", "; ".join(sorted(why)))
    return done
