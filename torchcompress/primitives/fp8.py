"""FP8 (e4m3, the ``float8_e4m3fn`` encoding: no infinities, max 448) quantization math.

* weights per output channel: ``scale[n] = max_k |W[n, k]| / 448`` (fp32, shape (N, 1)),
  ``q = e4m3(W / scale)``; ``W_hat = q * scale``;
* weights per 128x128 block (DeepSeek-V3 style): one fp32 scale per block, shape
  (ceil(N/128), ceil(K/128)); edge blocks are partial;
* activations dynamic per token (at forward time): one scale per row of ``x`` (..., K), or per
  token and group of ``group`` consecutive inputs (block-FP8 activations).

Rounding is the IEEE round-to-nearest-even of torch's cast to ``float8_e4m3fn``; values are clamped
to +-448 first (the cast would turn anything above into NaN). Scales are kept finite and positive:
an all-zero row/block gets scale 1, tiny ones the smallest normal fp32 number.

Example::

    q, s = quantize_fp8_channel(w)        # (N, K) float8_e4m3fn, (N, 1) float32
    w_hat = q.float() * s
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .affine import check_finite

E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
_TINY = torch.finfo(torch.float32).tiny


def fp8_scale_from_absmax(amax: torch.Tensor) -> torch.Tensor:
    """fp32 scales that map ``amax`` to 448; zero -> 1, tiny -> the smallest normal fp32."""
    s = amax.float() / E4M3_MAX
    s = torch.where(amax == 0, torch.ones_like(s), s)
    return s.clamp(min=_TINY)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float values to e4m3 (nearest, ties to even), saturating at +-448 (never NaN)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def quantize_fp8_channel(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> (codes (N, K) float8_e4m3fn, scale (N, 1) float32)."""
    check_finite(w, name)
    wf = w.detach().float()
    scale = fp8_scale_from_absmax(wf.abs().amax(dim=1, keepdim=True))  # (N, 1)
    return to_e4m3(wf / scale), scale


def _block_view(x: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, int, int]:
    """(N, K) zero-padded to whole blocks -> (N/bn, bn, K/bk, bk) view and the padded sizes."""
    n, k = x.shape
    pn, pk = (-n) % bn, (-k) % bk
    xp = F.pad(x, (0, pk, 0, pn))
    return xp.view((n + pn) // bn, bn, (k + pk) // bk, bk), n + pn, k + pk


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128),
                       name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> (codes (N, K) float8_e4m3fn, scale (ceil(N/bn), ceil(K/bk)) float32)."""
    check_finite(w, name)
    bn, bk = block
    n, k = w.shape
    v, _, _ = _block_view(w.detach().float(), bn, bk)  # (Nb, bn, Kb, bk)
    scale = fp8_scale_from_absmax(v.abs().amax(dim=(1, 3)))  # (Nb, Kb)
    q = to_e4m3(v / scale[:, None, :, None]).view(v.shape[0] * bn, v.shape[2] * bk)
    return q[:n, :k].contiguous(), scale


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """(Nb, Kb) block scales -> (N, K) per-element scales."""
    bn, bk = block
    return scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[: shape[0], : shape[1]]


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes * scales: per-channel (scale (N, 1)) or per block (scale (Nb, Kb), ``block`` given)."""
    s = scale if block is None else expand_block_scale(scale, tuple(q.shape), block)
    return (q.float() * s.float()).to(dtype)


def fp8_qdq_per_token(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: (..., K) -> (codes fp8 (..., K), scale, dequantized fp32).

    ``group=None``: one scale per token, shape (..., 1). Otherwise one per token and ``group``
    consecutive inputs (K must be a multiple), shape (..., K/group).
    """
    xf = x.float()
    if group is None:
        scale = fp8_scale_from_absmax(xf.abs().amax(dim=-1, keepdim=True))
        q = to_e4m3(xf / scale)
        return q, scale, q.float() * scale
    g = xf.unflatten(-1, (-1, group))  # (..., K/g, g)
    scale = fp8_scale_from_absmax(g.abs().amax(dim=-1, keepdim=True))
    q = to_e4m3(g / scale)
    return q.flatten(-2), scale.squeeze(-1), (q.float() * scale).flatten(-2)
