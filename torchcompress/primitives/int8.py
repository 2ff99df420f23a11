"""INT8 W8A8 math: symmetric int8 weights per output channel, int8 activations per token.

``scale = max|row| / 127`` (fp32), ``q = clamp(round(x / scale), -128, 127)`` (round half to even),
``x_hat = q * scale``. This is the scale vLLM's dynamic per-token int8 kernels use. All-zero rows get
scale 1, tiny ones the smallest normal fp32 number.

Example::

    q, s = quantize_int8_channel(w)     # (N, K) int8, (N, 1) float32
"""

from __future__ import annotations

import torch

from .affine import check_finite

INT8_MAX = 127.0
_TINY = torch.finfo(torch.float32).tiny


def int8_scale_from_absmax(amax: torch.Tensor) -> torch.Tensor:
    s = amax.float() / INT8_MAX
    return torch.where(amax == 0, torch.ones_like(s), s).clamp(min=_TINY)


def _round_clamp(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x).clamp(-128, 127).to(torch.int8)


def quantize_int8_channel(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> (codes (N, K) int8, scale (N, 1) float32)."""
    check_finite(w, name)
    wf = w.detach().float()
    scale = int8_scale_from_absmax(wf.abs().amax(dim=1, keepdim=True))
    return _round_clamp(wf / scale), scale


def int8_qdq_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., K) -> (codes int8, scale (..., 1) fp32, dequantized fp32)."""
    xf = x.float()
    scale = int8_scale_from_absmax(xf.abs().amax(dim=-1, keepdim=True))
    q = _round_clamp(xf / scale)
    return q, scale, q.float() * scale
