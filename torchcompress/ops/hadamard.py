"""The online Hadamard transform ``y = x @ H_n / sqrt(n)`` along the last dim (QuaRot's online rotation).

One implementation in PyTorch ops (log2 butterflies for the power-of-two factor and a small dense
``k x k`` product for the base order, :func:`~torchcompress.primitives.hadamard.hadamard_transform`),
so the same code runs on the CPU and on CUDA and traces under ``torch.compile``; half-precision
inputs are transformed in float32 (the butterflies' sums would round at every stage otherwise).
"""

from __future__ import annotations

import torch

from ..primitives.hadamard import hadamard_transform as _transform


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` (n = x.shape[-1], an order ``k * 2^m`` with a built base ``k``), x's dtype."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return _transform(x.float()).to(x.dtype)
    return _transform(x)
