"""ggml's K-quants (256-weight super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Quantizers follow ``quantize_row_q*_K_ref`` (no importance weights) in ggml-quants.c; the scale
searches live in :mod:`gguf_kquant_search`. Block layouts (little-endian, QK_K = 256):

    Q2_K  scales[16] (lo: scale, hi: min, 4 bits each) | qs[64] | d:f16 | dmin:f16
    Q3_K  hmask[32] | qs[64] | scales[12] (16 x 6-bit, offset 32) | d:f16
    Q4_K  d:f16 | dmin:f16 | scales[12] (8 scales + 8 mins, 6 bits) | qs[128]
    Q5_K  d:f16 | dmin:f16 | scales[12] | qh[32] | qs[128]
    Q6_K  ql[128] | qh[64] | scales:i8[16] | d:f16
"""

from __future__ import annotations

import torch

from .gguf_common import blocks_view, cdiv, fp16_bytes, fp16_from_bytes, fp16_round, nearest_int
from .gguf_kquant_search import make_q3_quants_rmse, make_qkx2_quants, make_qx_quants_rmse1
from .gguf_kquant_search import _acc

QK_K = 256
CHUNK = 4096  # super-blocks per pass: bounds temporaries to a few tens of MB


def _chunked(fn):
    def run(x: torch.Tensor) -> torch.Tensor:
        b = blocks_view(x, QK_K)
        return torch.cat([fn(b[i : i + CHUNK]) for i in range(0, b.shape[0], CHUNK)], dim=0)

    run.__name__ = fn.__name__.lstrip("_")
    run.__doc__ = fn.__doc__
    return run


def _sub_t(b: torch.Tensor, n: int) -> torch.Tensor:
    """(nb, 256) -> (n, nb*256/n): element index first, one column per sub-block."""
    return b.reshape(-1, n).t().contiguous()


def _from_sub_t(L: torch.Tensor, nb: int) -> torch.Tensor:
    return L.t().reshape(nb, QK_K)


def _pos_max(v: torch.Tensor) -> torch.Tensor:
    """Row max clamped to +0.0 (the C loops start at 0 and take strictly larger values)."""
    m = v.amax(-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _u8(v: torch.Tensor) -> torch.Tensor:
    return (v & 0xFF).to(torch.uint8)


def _pack2(L: torch.Tensor) -> torch.Tensor:
    """(nb, 256) 2-bit codes -> (nb, 64): byte h*32+l holds L[h*128 + l + 32*k] at bits 2k."""
    q = L.reshape(-1, 2, 4, 32)
    return _u8(q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins -> the 12-byte layout ``get_scale_min_k4`` reads."""
    out = torch.empty(ls.shape[0], 12, dtype=torch.int32)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return _u8(out)


def _unpack_scales_k4(sc: torch.Tensor):
    sc = sc.to(torch.int32)
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    ls = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    lm = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return ls, lm


def _requant(b, L, d_eff, dm_eff, n, lo, hi):
    """Second pass with the stored (fp16-rounded) scales; sub-blocks whose scale is 0 keep L."""
    nb = b.shape[0]
    xs = b.reshape(nb, -1, n)
    num = xs if dm_eff is None else xs + dm_eff.unsqueeze(-1)
    l = nearest_int(num / d_eff.unsqueeze(-1)).clamp_(lo, hi) - lo
    keep = (d_eff == 0).unsqueeze(-1)
    return torch.where(keep, L.reshape(nb, -1, n), l).reshape(nb, QK_K)


def _asym(b, n, nmax, rmin, rdelta, nstep, use_mad, weights):
    nb = b.shape[0]
    xt = _sub_t(b, n)
    scale, the_min, L = make_qkx2_quants(xt, weights(xt), nmax, rmin, rdelta, nstep, use_mad)
    return scale.reshape(nb, -1), the_min.reshape(nb, -1), _from_sub_t(L, nb)


def _w_q4k(xt: torch.Tensor) -> torch.Tensor:
    sum_x2 = _acc(xt[i] * xt[i] for i in range(xt.shape[0]))
    # sqrtf is correctly rounded; torch's float32 CPU sqrt is not (off by 1 ulp for ~20% of inputs).
    # sqrt in float64 rounded once to float32 is correctly rounded.
    av_x = torch.sqrt((sum_x2 / 32.0).double()).float()
    return av_x + xt.abs()


@_chunked
def _quantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    scales, mins, L = _asym(b, 16, 3, -0.5, 0.1, 15, True, torch.abs)
    max_scale, max_min = _pos_max(scales), _pos_max(mins)
    has_s, has_m = (max_scale > 0).unsqueeze(1), (max_min > 0).unsqueeze(1)
    ls = torch.where(has_s, nearest_int(cdiv(15.0, max_scale).unsqueeze(1) * scales), 0)
    lm = torch.where(has_m, nearest_int(cdiv(15.0, max_min).unsqueeze(1) * mins), 0)
    sc = (ls & 0xFF) | (lm << 4)  # uint8 field: low nibble scale, high nibble min
    sc = sc & 0xFF
    d = torch.where(has_s[:, 0], max_scale / 15.0, 0.0)
    dmin = torch.where(has_m[:, 0], max_min / 15.0, 0.0)
    return q2_k_finish(b, L, sc, d, dmin)


def q2_k_finish(b, L, sc, d, dmin):
    """Q2_K bytes from codes L (nb, 256), scale bytes sc (nb, 16) (low nibble scale, high min) and
    the super-block scales d, dmin (nb,)."""
    d_eff = fp16_round(d).unsqueeze(1) * (sc & 0xF).to(torch.float32)
    dm_eff = fp16_round(dmin).unsqueeze(1) * (sc >> 4).to(torch.float32)
    L = _requant(b, L, d_eff, dm_eff, 16, 0, 3)
    return torch.cat([_u8(sc), _pack2(L), fp16_bytes(d), fp16_bytes(dmin)], dim=1)


@_chunked
def _quantize_q3_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    scale, L = make_q3_quants_rmse(_sub_t(b, 16), 4)
    scales, L = scale.reshape(nb, 16), _from_sub_t(L, nb)
    idx = scales.abs().argmax(1, keepdim=True)
    max_scale = scales.gather(1, idx)[:, 0]
    nz = max_scale != 0
    iscale = cdiv(-32.0, max_scale)
    l = nearest_int(iscale.unsqueeze(1) * scales)
    l = ((l & 0xFF) ^ 0x80) - 0x80  # int8_t l = nearest_int(...)
    l = torch.where(nz.unsqueeze(1), l.clamp(-32, 31) + 32, 0)  # 6-bit codes, offset 32
    return q3_k_finish(b, L, l, torch.where(nz, cdiv(1.0, iscale), 0.0))


def q3_k_finish(b: torch.Tensor, L: torch.Tensor, l: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q3_K bytes from codes L (nb, 256) in [0, 8), 6-bit scale codes l (nb, 16) and the scale d (nb,)."""
    nb = b.shape[0]
    packed = torch.empty(nb, 12, dtype=torch.int32)
    packed[:, 0:8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    hi = (l >> 4).reshape(nb, 4, 4)  # [j/4][j%4]
    packed[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    d_eff = fp16_round(d).unsqueeze(1) * (l - 32).to(torch.float32)
    L = _requant(b, L, d_eff, None, 16, -4, 3)  # codes 0..7 (0 for an all-zero sub-block)
    high = L > 3
    L = torch.where(high, L - 4, L)
    hb = high.to(torch.int32).reshape(nb, 8, 32)  # bit j//32 of hmask[j%32]
    hmask = (hb << torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)).sum(1)
    return torch.cat([_u8(hmask), _pack2(L), _u8(packed), fp16_bytes(d)], dim=1)


def _quantize_q45_k(b, nmax, rmin, nstep):
    scales, mins, L = _asym(b, 32, nmax, rmin, 0.1, nstep, False, _w_q4k)
    max_scale, max_min = _pos_max(scales), _pos_max(mins)
    inv_s = torch.where(max_scale > 0, cdiv(63.0, max_scale), 0.0).unsqueeze(1)
    inv_m = torch.where(max_min > 0, cdiv(63.0, max_min), 0.0).unsqueeze(1)
    ls = (nearest_int(inv_s * scales) & 0xFF).clamp(max=63)  # uint8_t, then MIN(63, .)
    lm = (nearest_int(inv_m * mins) & 0xFF).clamp(max=63)
    return q45_k_finish(b, L, ls, lm, max_scale / 63.0, max_min / 63.0, nmax)


def q45_k_finish(b, L, ls, lm, d, dmin, nmax):
    """Q4_K/Q5_K head bytes (d | dmin | scales) and the requantized codes, from scale and min codes
    ls, lm (nb, 8) (byte values) and super-block scales d, dmin (nb,). The requantization reads the
    codes back from the packed bytes, as ggml does (the same values unless a code exceeds 63)."""
    packed = _pack_scales_k4(ls, lm)
    ls, lm = _unpack_scales_k4(packed)
    d_eff = fp16_round(d).unsqueeze(1) * ls.to(torch.float32)
    dm_eff = fp16_round(dmin).unsqueeze(1) * lm.to(torch.float32)
    L = _requant(b, L, d_eff, dm_eff, 32, 0, nmax)
    head = torch.cat([fp16_bytes(d), fp16_bytes(dmin), packed], dim=1)
    return head, L


def pack_q4_k(head: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    q = L.reshape(-1, 4, 2, 32)
    return torch.cat([head, _u8(q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)], dim=1)


@_chunked
def _quantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    return pack_q4_k(*_quantize_q45_k(b, 15, -1.0, 20))


@_chunked
def _quantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    return pack_q5_k(*_quantize_q45_k(b, 31, -0.5, 15))


def pack_q5_k(head: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    q = L.reshape(-1, 4, 2, 32)  # [group g][half][j]
    hbits = (q >> 4) & 1
    shifts = (2 * torch.arange(4, dtype=torch.int32)).reshape(1, 4, 1, 1) + torch.tensor([0, 1]).reshape(1, 1, 2, 1)
    qh = (hbits << shifts).sum((1, 2))
    ql = (q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)
    return torch.cat([head, _u8(qh), _u8(ql).reshape(-1, 128)], dim=1)


@_chunked
def _quantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    scale, L = make_qx_quants_rmse1(_sub_t(b, 16), 32)
    return q6_k_finish(b, scale.reshape(nb, 16), _from_sub_t(L, nb))


def q6_k_finish(b: torch.Tensor, scales: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Q6_K bytes from the 16 sub-block scales (nb, 16) and codes L (nb, 256) of the search."""
    nb = b.shape[0]
    idx = scales.abs().argmax(1, keepdim=True)
    max_scale = scales.gather(1, idx)[:, 0]
    zero = max_scale.abs() < 1e-15
    iscale = cdiv(-128.0, max_scale)
    d = cdiv(1.0, iscale)
    sc = nearest_int(iscale.unsqueeze(1) * scales).clamp(max=127)
    d_eff = fp16_round(d).unsqueeze(1) * sc.to(torch.float32)
    L = _requant(b, L, d_eff, None, 16, -32, 31)
    q = L.reshape(nb, 2, 4, 32)  # [half][quarter k][l] = L[h*128 + 32k + l]
    ql = torch.cat([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], dim=2)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    out = torch.cat([_u8(ql).reshape(nb, 128), _u8(qh).reshape(nb, 64), _u8(sc), fp16_bytes(d)], dim=1)
    return torch.where(zero.unsqueeze(1), torch.zeros_like(out), out)


quantize_q2_k, quantize_q3_k = _quantize_q2_k, _quantize_q3_k
quantize_q4_k, quantize_q5_k, quantize_q6_k = _quantize_q4_k, _quantize_q5_k, _quantize_q6_k


# -- dequantize: (nb, type_size) uint8 -> (nb, 256) float32 ---------------------------------------


def _unpack2(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32).reshape(-1, 2, 1, 32) >> (2 * torch.arange(4, dtype=torch.int32)).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, QK_K)


def dequantize_q2_k(blk: torch.Tensor) -> torch.Tensor:
    sc = blk[:, 0:16].to(torch.int32)
    d = fp16_from_bytes(blk[:, 80:82]).unsqueeze(1)
    dmin = fp16_from_bytes(blk[:, 82:84]).unsqueeze(1)
    dl = (d * (sc & 0xF).to(torch.float32)).unsqueeze(-1)
    ml = (dmin * (sc >> 4).to(torch.float32)).unsqueeze(-1)
    q = _unpack2(blk[:, 16:80]).reshape(-1, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(-1, QK_K)


def dequantize_q3_k(blk: torch.Tensor) -> torch.Tensor:
    nb = blk.shape[0]
    sc = blk[:, 96:108].to(torch.int32)
    lo = torch.cat([sc[:, :8] & 0xF, sc[:, :8] >> 4], dim=1)
    hi = ((sc[:, 8:12].unsqueeze(1) >> (2 * torch.arange(4, dtype=torch.int32)).reshape(1, 4, 1)) & 3).reshape(nb, 16)
    s = ((lo | (hi << 4)) - 32).to(torch.float32)
    d = fp16_from_bytes(blk[:, 108:110]).unsqueeze(1)
    dl = (d * s).unsqueeze(-1)
    hm = (blk[:, 0:32].to(torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)) & 1
    q = _unpack2(blk[:, 32:96]) - ((hm.reshape(nb, QK_K) ^ 1) << 2)
    return (dl * q.reshape(nb, 16, 16).to(torch.float32)).reshape(nb, QK_K)


def _dequant_q45(blk, q):
    d = fp16_from_bytes(blk[:, 0:2]).unsqueeze(1)
    dmin = fp16_from_bytes(blk[:, 2:4]).unsqueeze(1)
    ls, lm = _unpack_scales_k4(blk[:, 4:16])
    dl = (d * ls.to(torch.float32)).unsqueeze(-1)
    ml = (dmin * lm.to(torch.float32)).unsqueeze(-1)
    return (dl * q.reshape(-1, 8, 32).to(torch.float32) - ml).reshape(-1, QK_K)


def _unnib_k(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32).reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.int32).reshape(1, 1, 2, 1)
    return (q & 0xF).reshape(-1, QK_K)


def dequantize_q4_k(blk: torch.Tensor) -> torch.Tensor:
    return _dequant_q45(blk, _unnib_k(blk[:, 16:144]))


def dequantize_q5_k(blk: torch.Tensor) -> torch.Tensor:
    qh = (blk[:, 16:48].to(torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)) & 1
    return _dequant_q45(blk, _unnib_k(blk[:, 48:176]) | (qh.reshape(-1, QK_K) << 4))


def dequantize_q6_k(blk: torch.Tensor) -> torch.Tensor:
    nb = blk.shape[0]
    ql = blk[:, 0:128].to(torch.int32).reshape(nb, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.int32).reshape(1, 1, 2, 1)
    ql = (ql & 0xF).reshape(nb, 2, 4, 32)
    qh = blk[:, 128:192].to(torch.int32).reshape(nb, 2, 1, 32) >> (2 * torch.arange(4, dtype=torch.int32)).reshape(1, 1, 4, 1)
    q = (ql | ((qh & 3) << 4)) - 32
    s = blk[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = fp16_from_bytes(blk[:, 208:210]).unsqueeze(1)
    dl = (d * s).unsqueeze(-1)
    return (dl * q.reshape(nb, 16, 16).to(torch.float32)).reshape(nb, QK_K)
