"""ggml's importance-weighted (llama.cpp imatrix) quantizers in PyTorch: the ``quant_weights != NULL``
paths of ``quantize_q2_K`` ... ``quantize_q6_K`` and ``quantize_row_q4_0/q4_1/q5_0/q5_1_impl``.

The pure-PyTorch reference of ``kernels/cpu/gguf_quant.cpp``'s weighted paths (what
:func:`gguf_blocks.quantize` falls back to without the native extension), bit-exact with it and with
ggml. Same conventions as :mod:`gguf_kquant_search`: searches run on ``(n, M)`` tensors (element
index first, one column per sub-block), every C accumulation is a left-to-right chain of float32
additions, ``sqrtf`` is computed correctly rounded (float64 then one rounding to float32).

What the weights change, per type (``qw``: the importance of a column, ``sigma2``: mean square of
the super-block, or of the whole row for the 32-weight types; ``w = qw * sqrt(sigma2 + x*x)``):

    Q2_K  make_qkx3_quants(16, 3, w) per sub-block; scales and mins each by make_qp_quants(15)
          weighted by the sub-block's sum of w (sigma2 = sum x^2 / 256)
    Q3_K  make_qx_quants(16, 4, w); the 16 scales by make_qx_quants(32, sum w) (sigma2 = 2 sum x^2/256)
    Q4_K  make_qkx3_quants(32, 15, w); scales and mins by make_qp_quants(63)  (sigma2 = 2 sum x^2/256)
    Q5_K  as Q4_K with 31 levels; scale and min codes capped at 63
    Q6_K  make_qx_quants(16, 32, qw) (the raw importance, no sigma2); scales as unweighted
    Q4_0 / Q5_0  make_qx_quants(32, 8 / 16, w): its scale and codes are stored as they are
    Q4_1 / Q5_1  make_qkx3_quants(32, 15 / 31, w)

make_qkx3_quants with weights performs the same operations as :func:`make_qkx2_quants` (with
rmin=-0.9, rdelta=0.05, nstep=36, squared error), so that function is reused.
"""

from __future__ import annotations

import numpy as np
import torch

from . import gguf_kquants as _k
from .gguf_common import GGMLType, cdiv, fp16_bytes, nearest_int, row_bytes
from .gguf_kquant_search import (
    GROUP_MAX_EPS,
    _seqsum,
    make_qkx2_quants,
    make_qx_quants_rmse1,
)
from .gguf_legacy import _nibbles, _qh_bits

QK_K = 256
CHUNK = 2048  # super-blocks (or 8x as many 32-weight blocks) per pass


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (``sqrtf``): torch's float32 sqrt is not, on CPU."""
    return torch.sqrt(v.double()).float()


def _sum_sq(b: torch.Tensor) -> torch.Tensor:
    """(nb, n) -> (nb,): ``for (j...) s += x[j]*x[j]`` left to right."""
    sq = b * b
    return _seqsum(sq.t().contiguous())


def _qkx3(xt: torch.Tensor, wt: torch.Tensor, nmax: int):
    return make_qkx2_quants(xt, wt, nmax, -0.9, 0.05, 36, False)


def make_qp_quants(x: torch.Tensor, qw: torch.Tensor, nmax: int):
    """``make_qp_quants(n, nmax, x, L, qw)`` on (n, M) non-negative values (scales or mins of M
    super-blocks): a scale grid search then coordinate descent on the codes, weights ``qw``.

    Returns scale (M,) and L (n, M) int32: ggml's ``uint8_t`` codes (a negative code wraps to its
    byte, as in C; the sums use the int value where C does).
    """
    n = x.shape[0]
    mx = torch.zeros_like(x[0])
    for i in range(n):
        mx = torch.where(mx > x[i], mx, x[i])
    zero = mx < GROUP_MAX_EPS
    wx = qw * x

    def werr(scale, lf):
        diff = x - scale * lf
        return _seqsum(qw * diff * diff)

    iscale = cdiv(float(nmax), mx)
    L = nearest_int(iscale * x) & 0xFF
    best = werr(cdiv(1.0, iscale), L.to(torch.float32))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        c = float(np.float32(0.1) * np.float32(step) + np.float32(nmax))
        iscale_is = cdiv(c, mx)
        lf = nearest_int(iscale_is * x).clamp_(max=nmax).to(torch.float32)
        mse = werr(cdiv(1.0, iscale_is), lf)
        upd = mse < best
        best = torch.where(upd, mse, best)
        iscale = torch.where(upd, iscale_is, iscale)
    l = nearest_int(iscale * x).clamp_(max=nmax)
    L = l & 0xFF
    lf = l.to(torch.float32)
    sumlx = _seqsum(wx * lf)
    suml2 = _seqsum(qw * lf * lf)
    # ggml stops after a pass with no change; such a pass changes nothing, so 5 passes everywhere
    for _ in range(5):
        for i in range(n):
            li = L[i].to(torch.float32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - qw[i] * li * li
            new_l = nearest_int(x[i] * sl2 / slx).clamp_(max=nmax)
            nf = new_l.to(torch.float32)
            slx2 = slx + wx[i] * nf
            sl22 = sl2 + qw[i] * nf * nf
            upd = (slx > 0) & (sl2 > 0) & (new_l != L[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = torch.where(upd, new_l & 0xFF, L[i])
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L = torch.where(zero, torch.zeros_like(L), L)
    return torch.where(zero, torch.zeros_like(scale), scale), L


def _weights(xt: torch.Tensor, qt: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``qw[i] * sqrtf(sigma2 + x[i]*x[i])`` on (n, M); sigma2 (M,)."""
    return qt * _sqrt(sigma2 + xt * xt)


def _sub(b: torch.Tensor, q: torch.Tensor, n: int, sigma_mul: float):
    """Sub-block views of a chunk of super-blocks and their weights (sigma2 per super-block)."""
    sigma2 = sigma_mul * _sum_sq(b) / float(QK_K)
    xt, qt = _k._sub_t(b, n), _k._sub_t(q, n)
    return xt, _weights(xt, qt, sigma2.repeat_interleave(QK_K // n))


def _per_block(v: torch.Tensor, nb: int) -> torch.Tensor:
    """(nb * m,) per-sub-block values -> (m, nb): one column per super-block."""
    return v.reshape(nb, -1).t().contiguous()


def _q2_k(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    xt, wt = _sub(b, q, 16, 1.0)
    scales, the_min, L = _qkx3(xt, wt, 3)
    sw = _per_block(_seqsum(wt), nb)
    dm, ls = make_qp_quants(_per_block(scales, nb), sw, 15)
    mm, lm = make_qp_quants(_per_block(the_min, nb), sw, 15)
    sc = (ls.t() | (lm.t() << 4)) & 0xFF
    return _k.q2_k_finish(b, _k._from_sub_t(L, nb), sc, dm, mm)


def _q3_k(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    xt, wt = _sub(b, q, 16, 2.0)
    scale, L = make_qx_quants_rmse1(xt, 4, wt)
    sw = _per_block(_seqsum(wt), nb)
    d, ls = make_qx_quants_rmse1(_per_block(scale, nb), 32, sw)  # ls: 6-bit codes, offset 32
    return _k.q3_k_finish(b, _k._from_sub_t(L, nb), ls.t(), d)


def _q45_k(b: torch.Tensor, q: torch.Tensor, nmax: int):
    nb = b.shape[0]
    xt, wt = _sub(b, q, 32, 2.0)
    scales, the_min, L = _qkx3(xt, wt, nmax)
    sw = _per_block(_seqsum(wt), nb)
    d, ls = make_qp_quants(_per_block(scales, nb), sw, 63)
    dmin, lm = make_qp_quants(_per_block(the_min, nb), sw, 63)
    ls, lm = ls.t(), lm.t()
    if nmax == 31:
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    return _k.q45_k_finish(b, _k._from_sub_t(L, nb), ls, lm, d, dmin, nmax)


def _q6_k(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    scale, L = make_qx_quants_rmse1(_k._sub_t(b, 16), 32, _k._sub_t(q, 16))
    return _k.q6_k_finish(b, scale.reshape(nb, 16), _k._from_sub_t(L, nb))


_KQ = {
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: lambda b, q: _k.pack_q4_k(*_q45_k(b, q, 15)),
    GGMLType.Q5_K: lambda b, q: _k.pack_q5_k(*_q45_k(b, q, 31)),
    GGMLType.Q6_K: _q6_k,
}


def _legacy(b: torch.Tensor, q: torch.Tensor, sigma2: torch.Tensor, qtype: GGMLType) -> torch.Tensor:
    """32-weight blocks b (nb, 32), importance q (nb, 32), sigma2 (nb,) of each block's row."""
    xt, qt = b.t().contiguous(), q.t().contiguous()
    wt = _weights(xt, qt, sigma2)
    if qtype in (GGMLType.Q4_0, GGMLType.Q5_0):
        d, L = make_qx_quants_rmse1(xt, 8 if qtype == GGMLType.Q4_0 else 16, wt)
        head = [fp16_bytes(d)]
    else:
        d, the_min, L = _qkx3(xt, wt, 15 if qtype == GGMLType.Q4_1 else 31)
        head = [fp16_bytes(d), fp16_bytes(-the_min)]
    L = L.t()
    if qtype in (GGMLType.Q4_0, GGMLType.Q4_1):
        return torch.cat(head + [_nibbles(L)], dim=1)
    return torch.cat(head + [_qh_bits(L), _nibbles(L & 0x0F)], dim=1)


def quantize_imatrix(x: torch.Tensor, qtype: GGMLType, importance: torch.Tensor) -> torch.Tensor:
    """(R, K) float32 rows and (K,) importance -> (R, row_bytes) uint8: ggml's weighted quantizer
    for the K-quants and Q4_0/Q4_1/Q5_0/Q5_1 (the caller validates shapes and values)."""
    qtype = GGMLType(qtype)
    x = x.to(torch.float32).reshape(-1, x.shape[-1])
    rows, k = x.shape
    imp = importance.to(torch.float32).reshape(1, k).expand(rows, k)
    if qtype in _KQ:
        b, q, step = x.reshape(-1, QK_K), imp.reshape(-1, QK_K), CHUNK
        parts = [_KQ[qtype](b[i : i + step], q[i : i + step]) for i in range(0, b.shape[0], step)]
    else:
        sigma2 = _seqsum(x.t() * x.t()).div_(torch.full((rows,), float(k)))  # per row, / n_per_row
        b, q, step = x.reshape(-1, 32), imp.reshape(-1, 32), 8 * CHUNK
        s2 = sigma2.repeat_interleave(k // 32)
        parts = [_legacy(b[i : i + step], q[i : i + step], s2[i : i + step], qtype) for i in range(0, b.shape[0], step)]
    return torch.cat(parts, dim=0).reshape(rows, row_bytes(qtype, k))
