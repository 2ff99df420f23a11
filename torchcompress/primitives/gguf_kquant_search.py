"""ggml's per-sub-block scale searches (``make_qkx2_quants``, ``make_qx_quants``, ``make_q3_quants``).

Vectorized across sub-blocks, sequential across the elements of one sub-block: every tensor here is
laid out ``(n, M)`` (element index first, M sub-blocks), so the C loops ``for (i = 0; i < n; ++i)
acc += ...`` become ``n`` float32 additions of contiguous rows, in the same order, with the same
rounding. Never replace those loops with ``.sum()``: a tree reduction changes the low bits and with
them ggml's search decisions.
"""

from __future__ import annotations

import numpy as np
import torch

from .gguf_common import cdiv, nearest_int

GROUP_MAX_EPS = 1e-15


def _acc(rows) -> torch.Tensor:
    it = iter(rows)
    acc = next(it).clone()
    for r in it:
        acc += r
    return acc


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Left-to-right sum over dim -2 of (..., n, M): several C accumulators in one Python loop."""
    acc = t[..., 0, :].clone()
    for i in range(1, t.shape[-2]):
        acc += t[..., i, :]
    return acc


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """Asymmetric (scale, min) search of ``make_qkx2_quants``.

    x, w: (n, M) float32. Returns scale (M,), the_min (M,) (a positive offset: w = scale*L - the_min)
    and L (n, M) int32 in [0, nmax].
    """
    n = x.shape[0]
    mn = x[0]  # the C loop keeps the first of equal values: min's sign when +0.0 and -0.0 tie
    for i in range(1, n):  # (stored by the weighted Q4_1/Q5_1 as -the_min); amin picks either
        mn = torch.where(x[i] < mn, x[i], mn)
    mx = x.amax(0)
    sum_w = _acc(w[i] for i in range(n))
    sum_x = w[0] * x[0]
    for i in range(1, n):
        sum_x += w[i] * x[i]
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    iscale = cdiv(nmax, mx - mn)
    scale = cdiv(1.0, iscale)

    def error(s, m, lv):
        diff = s * lv + m - x
        diff = diff.abs() if use_mad else diff * diff
        return _seqsum(w * diff)

    # ggml's nearest_int, not torch.round: they agree for finite codes, but denormal sub-blocks give
    # iscale = inf and codes of inf/NaN, which nearest_int maps to 0 and torch.round does not.
    L = nearest_int(iscale * (x - mn)).clamp_(0, nmax).to(torch.float32)
    best = error(scale, mn, L)
    for step in range(nstep + 1):
        # the C loop uses the *current* min (updated below when a step wins) for range and codes
        f = np.float32
        c = float(f(rmin) + f(rdelta) * f(step) + f(nmax))  # float32 throughout, as in C
        iscale = cdiv(c, mx - mn)
        lf = nearest_int(iscale * (x - mn)).clamp_(0, nmax).to(torch.float32)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seqsum(torch.stack((wl, wl * lf, wl * x)))  # w*l, (w*l)*l, (w*l)*x
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, lf)
        upd = (D > 0) & (cur < best)
        L = torch.where(upd, lf, L)
        best = torch.where(upd, cur, best)
        scale = torch.where(upd, this_scale, scale)
        mn = torch.where(upd, this_min, mn)
    zero = torch.zeros_like(scale)
    L = torch.where(flat, torch.zeros_like(L), L).to(torch.int32)
    scale = torch.where(flat, zero, scale)
    return scale, -mn, L


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """(n, M) -> (M,): the first element of largest magnitude along dim 0, sign kept."""
    idx = x.abs().argmax(0, keepdim=True)
    return x.gather(0, idx)[0]


def make_qx_quants_rmse1(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None):
    """Symmetric search of ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` (Q6_K; with importance
    weights ``qw`` (n, M) also Q3_K, Q4_0, Q5_0 and Q3_K's scale quantization). ``qw=None`` is ggml's
    ``qw=NULL``: w = x*x.

    Returns scale (M,) and L (n, M) int32 in [0, 2*nmax).
    """
    n = x.shape[0]
    mx = _signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    wx = w * x

    def pass_(iscale):
        l = nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
        lf = l.to(torch.float32)
        sumlx = _acc(wx[i] * lf[i] for i in range(n))
        suml2 = _acc(w[i] * lf[i] * lf[i] for i in range(n))
        return l, sumlx, suml2

    l, sumlx, suml2 = pass_(cdiv(-nmax, mx))
    L = l + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        c = float(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        l, sumlx, suml2 = pass_(cdiv(-c, mx))
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(upd, l + nmax, L)
        scale = torch.where(upd, sumlx / suml2, scale)
        best = torch.where(upd, scale * sumlx, best)
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def make_q3_quants_rmse(x: torch.Tensor, nmax: int = 4):
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: coordinate descent on the codes.

    The C code stops a sub-block after a pass with no change; such a pass leaves the state
    unchanged, so running all 5 passes on every sub-block gives the same result.
    Returns scale (M,) and L (n, M) int32 (L + nmax, or 0 for an all-zero sub-block).
    """
    n = x.shape[0]
    mx = _signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    iscale = cdiv(-nmax, mx)
    L = nearest_int(iscale * x).clamp_(-nmax, nmax - 1)  # signed codes during the search
    w = x * x
    wx = w * x
    lf = L.to(torch.float32)
    sumlx = _acc(wx[i] * lf[i] for i in range(n))
    suml2 = _acc(w[i] * lf[i] * lf[i] for i in range(n))
    for _ in range(5):
        for i in range(n):
            li = L[i].to(torch.float32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = nearest_int(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1)
            nf = new_l.to(torch.float32)
            slx2 = slx + wx[i] * nf
            sl22 = sl2 + w[i] * nf * nf
            upd = (slx > 0) & (new_l != L[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = torch.where(upd, new_l, L[i])
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L = torch.where(zero, torch.zeros_like(L), L + nmax)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L
