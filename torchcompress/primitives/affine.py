"""Round-to-nearest affine (integer) quantization with correct zero-point math.

Codes are always stored unsigned, in ``[0, 2^bits - 1]``:

* symmetric:  ``code = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1) + 2^(b-1)``, ``w_hat = (code - 2^(b-1)) * s``
  with ``s = max|w| / (2^(b-1) - 1)``;
* asymmetric: ``code = clamp(round(w / s) + z, 0, 2^b - 1)``, ``w_hat = (code - z) * s`` with
  ``s = (max(w, 0) - min(w, 0)) / (2^b - 1)`` and the integer zero point ``z = round(-min(w, 0) / s)``.
  Because the range always contains 0, a weight of exactly 0 dequantizes to exactly 0.

The scale is cast to the scheme's scale dtype *before* the codes are computed, so the stored
(scale, zero, codes) triple reproduces ``w_hat`` exactly. Scales are kept finite and non-zero:
an all-zero group gets scale 1, tiny groups the smallest positive number of the scale dtype (fp16:
its smallest subnormal, 2^-24; others: the smallest normal), huge ones the largest finite value (their codes then saturate). Subnormal fp16 scales (below
6.1e-5: 8-bit rows of weights under ~8e-3) keep their rows' accuracy close to fp32 scales, where a
floor at the smallest normal fp16 would make them coarse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Granularity, QuantScheme
from ..errors import NumericError


@dataclass
class AffineQuantized:
    """Unpacked result of :func:`quantize_affine` for a 2-D weight ``(N, K)``."""

    codes: torch.Tensor  # (N, K) uint8, unsigned codes
    scale: torch.Tensor  # (N, G) scale dtype, or (1, 1) for per-tensor
    zero: torch.Tensor | None  # (N, G) uint8 for asymmetric, None for symmetric
    group_size: int  # effective group length along K (K for per-channel and per-tensor)


def check_finite(w: torch.Tensor, name: str) -> None:
    """Reject empty, NaN or Inf weights with an error naming the tensor."""
    if w.numel() == 0:
        raise NumericError(name, f"is empty (shape {tuple(w.shape)})")
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NumericError(name, f"holds {bad} NaN/Inf value(s) of {w.numel()}; refusing to quantize")


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def effective_group_size(scheme: QuantScheme, in_features: int) -> int:
    if scheme.granularity is Granularity.GROUP:
        return min(scheme.group_size, in_features)
    return in_features


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, G, group_size), zero-padding a partial last group.

    Zero padding never changes a group's statistics: symmetric uses max|w| (0 adds nothing) and
    asymmetric ranges already include 0.
    """
    n, k = w.shape
    g = num_groups(k, group_size)
    pad = g * group_size - k
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(n, g, group_size)


def _sanitize_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # All-zero groups: any scale reproduces them; 1 keeps the math finite.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    info = torch.finfo(dtype)
    # fp16: down to its smallest subnormal (2^-24); bf16/fp32 have fp32's exponent range, their normal floor
    low = 2.0**-24 if dtype == torch.float16 else info.tiny
    return scale.clamp(min=low, max=info.max).to(dtype)


def compute_qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Scales (and zero points) for a 2-D weight ``(N, K)``. Returns ``(scale, zero, group_size)``."""
    n, k = w.shape
    wf = w.detach().float()
    if scheme.granularity is Granularity.TENSOR:
        groups = wf.reshape(1, 1, n * k)
    else:
        groups = _grouped(wf, effective_group_size(scheme, k))
    group_size = effective_group_size(scheme, k)
    qmax_u = (1 << scheme.bits) - 1
    if scheme.symmetric:
        amax = groups.abs().amax(dim=-1)  # (N, G)
        scale = _sanitize_scale(amax / ((1 << (scheme.bits - 1)) - 1), scheme.torch_scale_dtype)
        return scale, None, group_size
    wmin = groups.amin(dim=-1).clamp(max=0)
    wmax = groups.amax(dim=-1).clamp(min=0)
    scale = _sanitize_scale((wmax - wmin) / qmax_u, scheme.torch_scale_dtype)
    if scheme.float_zero:  # the zero point exactly where min/max puts it, stored like the scale
        return scale, (-wmin / scale.float()).to(scale.dtype), group_size
    zero = torch.round(-wmin / scale.float()).clamp(0, qmax_u).to(torch.uint8)
    return scale, zero, group_size


def search_qparams(
    w: torch.Tensor, scheme: QuantScheme, *, norm: float = 2.4, grid: int = 100, maxshrink: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Scales (and zero points) that minimise each group's ``sum |w_hat - w|^norm`` over shrunken ranges.

    The range of every group is shrunk by ``p = 1 - i / grid`` for ``i = 0 .. int(maxshrink * grid)``
    (both ends together: the clip-search the GPTQ reference's quantizer runs with ``mse=True``,
    norm 2.4 and grid 100 there); ``p = 1`` is plain :func:`compute_qparams`, so the result is never
    worse than it in that norm. Returns ``(scale, zero, group_size)`` like :func:`compute_qparams`.
    """
    if grid < 1 or not 0 <= maxshrink < 1 or norm <= 0:
        raise ValueError(f"search_qparams: need grid >= 1, 0 <= maxshrink < 1, norm > 0 (got {grid}, {maxshrink}, {norm})")
    wf = w.detach().float()
    n, k = wf.shape
    best_s, best_z, gs = compute_qparams(wf, scheme)

    def err(s, z):
        q = quantize_with_qparams(wf, s, z, scheme.bits, gs)
        e = (dequantize_affine(q, s, z, scheme.bits, gs) - wf).abs_().pow_(norm)
        if s.shape == (1, 1):
            return e.sum().reshape(1, 1)
        return _grouped(e, gs).sum(-1)

    best_e = err(best_s, best_z)
    for i in range(1, int(maxshrink * grid) + 1):
        s, z, _ = compute_qparams(wf * (1 - i / grid), scheme)
        e = err(s, z)
        better = e < best_e
        if bool(better.any()):
            best_e = torch.where(better, e, best_e)
            best_s = torch.where(better, s, best_s)
            if best_z is not None:
                best_z = torch.where(better, z, best_z)
    return best_s, best_z, gs


def _expand(p: torch.Tensor, n: int, k: int, group_size: int) -> torch.Tensor:
    """Broadcast per-group params (N, G) or (1, 1) to (N, K)."""
    if p.shape == (1, 1):
        return p.expand(n, k)
    return p.repeat_interleave(group_size, dim=1)[:, :k]


def quantize_with_qparams(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Codes (N, K) uint8 for given scales/zeros (the RTN rounding step; GPTQ reuses it per column)."""
    n, k = w.shape
    s = _expand(scale.float(), n, k, group_size)
    q = torch.round(w.float() / s)
    if zero is None:
        half = 1 << (bits - 1)
        q = q.clamp(-half, half - 1) + half
    elif zero.is_floating_point():  # a float zero point (HQQ): round after the shift
        q = torch.round(w.float() / s + _expand(zero.float(), n, k, group_size)).clamp(0, (1 << bits) - 1)
    else:
        q = (q + _expand(zero.float(), n, k, group_size)).clamp(0, (1 << bits) - 1)
    return q.to(torch.uint8)


def quantize_affine(w: torch.Tensor, scheme: QuantScheme, name: str = "weight") -> AffineQuantized:
    """RTN-quantize a 2-D weight ``(N, K)``.

    >>> q = quantize_affine(torch.randn(8, 64), QuantScheme(bits=4, group_size=32))
    >>> q.codes.shape, q.scale.shape
    (torch.Size([8, 64]), torch.Size([8, 2]))
    """
    if w.dim() != 2:
        raise NumericError(name, f"must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    check_finite(w, name)
    scale, zero, gs = compute_qparams(w, scheme)
    codes = quantize_with_qparams(w, scale, zero, scheme.bits, gs)
    return AffineQuantized(codes=codes, scale=scale, zero=zero, group_size=gs)


def dequantize_affine(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_affine`: ``(codes - zero) * scale`` as ``dtype``, shape (N, K)."""
    n, k = codes.shape
    if scale.shape == (1, 1):
        zp = float(1 << (bits - 1)) if zero is None else zero.float()
        return ((codes.float() - zp) * scale.float()).to(dtype)
    g = scale.shape[1]
    q = codes.float()
    pad = g * group_size - k
    if pad:
        q = F.pad(q, (0, pad))
    q = q.view(n, g, group_size)  # (N, G, gs)
    zp = (1 << (bits - 1)) if zero is None else zero.float().unsqueeze(-1)
    w = (q - zp) * scale.float().unsqueeze(-1)
    return w.view(n, g * group_size)[:, :k].to(dtype)


def fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype (no gradient handling; see nn.ste)."""
    q = quantize_affine(w, scheme)
    return dequantize_affine(q.codes, q.scale, q.zero, scheme.bits, q.group_size, w.dtype)


sanitize_scale = _sanitize_scale  # public name (nn/ uses it for learned step sizes)
