"""llama.cpp's 4-bit non-linear types IQ4_NL and IQ4_XS in PyTorch, bit-exact with ggml's quantizer
(``quantize_iq4_nl`` / ``quantize_iq4_xs`` in ggml-quants.c, what llama.cpp's ``quantize`` calls, with
or without an imatrix) and its dequantizer.

Both map each weight to one of 16 fixed levels (``KVALUES``, a non-uniform grid denser near 0)
times a per-32-weight scale:

    IQ4_NL  block of 32: fp16 d, 16 bytes of 4-bit indices                    (18 bytes, 4.5 bpw)
    IQ4_XS  super-block of 256: fp16 d, 8 six-bit scales (scales_h: 2 high bits each in a uint16,
            scales_l: 4 low bits each in 4 bytes), 128 bytes of indices    (136 bytes, 4.25 bpw)
            weight = d * (scale - 32) * KVALUES[index]

The quantizer, per 32-weight block: importance ``w = x^2`` (or ``qw * sqrt(sigma2 + x^2)`` with an
imatrix, ``sigma2 = 2 * sum x^2 / super-block size``); ``d = max / 127`` from the signed value of
largest magnitude; indices by nearest level of ``x / d``; the least-squares scale
``sum(w q x) / sum(w q^2)``; then 15 more tries ``1/d = (t - 127) / max`` for ``t = -7 .. 7``, keeping
the one with the largest ``sumqx^2 / sumq2``. IQ4_NL stores that scale (fp16) and re-picks indices
with it; IQ4_XS quantizes the 8 scales to 6 bits against ``d = -max_scale / 32`` and re-picks indices
with each ``d * l``. Same float32, one-operation-at-a-time conventions as :mod:`gguf_common`.
"""

from __future__ import annotations

import torch

from .gguf_common import cdiv, fp16_bytes, fp16_from_bytes, nearest_int
from .gguf_kquant_search import GROUP_MAX_EPS, _seqsum

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs (llama.cpp's quantize)


def _kv(device=None) -> torch.Tensor:
    return torch.tensor(KVALUES, dtype=torch.float32, device=device)


def best_index(a: torch.Tensor) -> torch.Tensor:
    """ggml's ``best_index_int8(16, kvalues, a)``: the nearest level (ties to the upper one), int64."""
    v = _kv(a.device)
    mu = torch.bucketize(a, v, right=True).clamp(1, 15)  # #levels <= a: val[mu-1] <= a < val[mu] inside the range
    lo, hi = v[mu - 1], v[mu]
    idx = torch.where((a - lo) < (hi - a), mu - 1, mu)
    idx = torch.where(a <= v[0], torch.zeros_like(idx), idx)
    return torch.where((a >= v[15]) | torch.isnan(a), torch.full_like(idx, 15), idx)  # NaN: C's search ends at 15


def _sqrt(v: torch.Tensor) -> torch.Tensor:  # sqrtf, correctly rounded
    return torch.sqrt(v.double()).float()


def _weights(sb: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """(S, n) super-blocks -> (S, n) importance: x^2, or qw * sqrt(sigma2 + x^2)."""
    if qw is None:
        return sb * sb
    sigma2 = _seqsum((sb * sb).t().contiguous()) * (2.0 / sb.shape[1])  # (S,)
    return qw * _sqrt(sigma2[:, None] + sb * sb)


def block_scales(xt: torch.Tensor, wt: torch.Tensor, ntry: int = NTRY) -> torch.Tensor:
    """(32, M) weights and importances (one 32-weight block per column) -> (M,) float32 scales
    (the first pass of ``quantize_row_iq4_nl_impl``); 0 for blocks with max |x| < 1e-15."""
    m = xt.shape[1]
    amax = torch.zeros(m)
    mx = torch.zeros(m)
    ax = xt.abs()
    for j in range(xt.shape[0]):  # the first element of largest magnitude, with its sign
        upd = ax[j] > amax
        amax = torch.where(upd, ax[j], amax)
        mx = torch.where(upd, xt[j], mx)
    zero = amax < GROUP_MAX_EPS
    v = _kv()

    def sums(iscale):
        q = v[best_index(iscale * xt)]
        wq = wt * q
        return _seqsum(wq * xt), _seqsum(wq * q)

    d = (-mx) / torch.full_like(mx, float(KVALUES[0])) if ntry > 0 else mx / torch.full_like(mx, float(KVALUES[0]))
    sumqx, sumq2 = sums(cdiv(1.0, d))
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(d))
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = sums(torch.full_like(mx, float(itry + KVALUES[0])) / mx)
        upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(upd, sumqx / sumq2, d)
        best = torch.where(upd, d * sumqx, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """(..., 32) indices -> (..., 16) bytes: ``L[j] | L[j + 16] << 4``."""
    return (idx[..., :16] | (idx[..., 16:] << 4)).to(torch.uint8)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int64)
    return torch.cat([q & 0xF, q >> 4], dim=-1)  # (..., 32)


def quantize_iq4_nl(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """(R, K) float32, K % 32 == 0 -> (R, K / 32 * 18) uint8; ``importance`` (K,) or None."""
    r, k = x.shape
    b = x.reshape(-1, 32)  # (R * K/32, 32)
    qw = None if importance is None else importance.reshape(1, k).expand(r, k).reshape(-1, 32)
    w = _weights(b, qw)
    d = block_scales(b.t().contiguous(), w.t().contiguous())
    iscale = torch.where(d != 0, cdiv(1.0, d), torch.zeros_like(d))
    idx = best_index(iscale[:, None] * b)
    out = torch.cat([fp16_bytes(d), _pack_nibbles(idx)], dim=1)  # (nb, 18)
    return out.reshape(r, -1)


def quantize_iq4_xs(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """(R, K) float32, K % 256 == 0 -> (R, K / 256 * 136) uint8; ``importance`` (K,) or None."""
    r, k = x.shape
    sb = x.reshape(-1, 256)  # (S, 256)
    s = sb.shape[0]
    qw = None if importance is None else importance.reshape(1, k).expand(r, k).reshape(-1, 256)
    w = _weights(sb, qw)
    blocks = sb.reshape(-1, 32)  # (S * 8, 32)
    scales = block_scales(blocks.t().contiguous(), w.reshape(-1, 32).t().contiguous()).reshape(s, 8)
    amax = torch.zeros(s)
    ms = torch.zeros(s)
    for ib in range(8):  # the first scale of largest magnitude, with its sign
        upd = scales[:, ib].abs() > amax
        amax = torch.where(upd, scales[:, ib].abs(), amax)
        ms = torch.where(upd, scales[:, ib], ms)
    d = (-ms) / torch.full_like(ms, 32.0)  # (S,); all-zero super-blocks give -0.0, as in C
    iscale = torch.where(d != 0, cdiv(1.0, d), torch.zeros_like(d))
    lv = nearest_int(iscale[:, None] * scales).clamp(-32, 31)  # (S, 8)
    dl = d[:, None] * lv.to(torch.float32)
    idl = torch.where(dl != 0, cdiv(1.0, dl), torch.zeros_like(dl))
    idx = best_index(idl[:, :, None] * sb.reshape(s, 8, 32))  # (S, 8, 32)
    code = (lv + 32).to(torch.int64)  # 0..63
    lo = code & 0xF
    scales_l = (lo[:, 0::2] | (lo[:, 1::2] << 4)).to(torch.uint8)  # (S, 4)
    hi = (code >> 4) << (2 * torch.arange(8))
    scales_h = hi.sum(1)  # (S,) disjoint bits
    sh = torch.stack([scales_h & 0xFF, scales_h >> 8], dim=1).to(torch.uint8)
    out = torch.cat([fp16_bytes(d), sh, scales_l, _pack_nibbles(idx).reshape(s, 128)], dim=1)  # (S, 136)
    return out.reshape(r, -1)


def dequantize_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 18) uint8 -> (nb * 32,) float32."""
    d = fp16_from_bytes(blocks[:, :2])
    return (d[:, None] * _kv()[_unpack_nibbles(blocks[:, 2:])]).reshape(-1)


def xs_scale_codes(blocks: torch.Tensor) -> torch.Tensor:
    """(S, 136) uint8 IQ4_XS super-blocks -> (S, 8) int64 six-bit scale codes (0..63)."""
    sh = blocks[:, 2].to(torch.int64) | (blocks[:, 3].to(torch.int64) << 8)
    sl = blocks[:, 4:8].to(torch.int64)
    lo = torch.stack([sl & 0xF, sl >> 4], dim=2).reshape(-1, 8)
    hi = (sh[:, None] >> (2 * torch.arange(8))) & 3
    return lo | (hi << 4)


def dequantize_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """(S, 136) uint8 -> (S * 256,) float32."""
    s = blocks.shape[0]
    d = fp16_from_bytes(blocks[:, :2])
    dl = d[:, None] * (xs_scale_codes(blocks) - 32).to(torch.float32)  # (S, 8)
    q = _kv()[_unpack_nibbles(blocks[:, 8:].reshape(s, 8, 16))]  # (S, 8, 32)
    return (dl[:, :, None] * q).reshape(-1)
