"""HQQ: data-free half-quadratic optimisation of per-group scales and zero points (Badri & Shaji, 2023).

The problem, per group of ``gs`` weights ``w``::

    min_{s, z}  || w - (Q(w; s, z) - z) * s ||_p^p,   p < 1,   Q(w; s, z) = clamp(round(w / s + z), 0, 2^b - 1)

is split with an auxiliary error ``w_e ~ w - w_hat`` and solved by alternating two closed-form steps
(half-quadratic splitting), with ``beta`` growing by ``kappa`` each iteration:

1. ``w_e = shrink_p(w - w_hat, beta)``, the generalised soft-threshold of the lp norm:
   ``sign(x) * max(|x| - |x|^(p-1) / beta, 0)`` (large errors, the outliers, stay in ``w_e``);
2. with the codes ``q`` fixed, the parameters that fit ``t = w - w_e`` in least squares:
   the zero point ``z = mean(q - t / s)`` (the paper's update) and, when ``optimize_scale``, first the
   scale ``s = cov(q, t) / var(q)`` (the least-squares slope of ``t`` on ``q``).

Two layouts, chosen by the scheme:

* ``float_zero=True`` (the hqq package's layout): the zero point is a float stored in the scale
  dtype; it starts from the group's min/max (``s = (max - min) / (2^b - 1)``, ``z = -min / s``,
  rounded with ``round_zero`` as the hqq package does at 4 bits) and moves freely. Codes are ``round(w / s + z)``. RTN's parameters are a candidate too.
* integer zero points (uint8, the default layout every kernel and export format reads): the solver
  runs on a continuous zero point and every iterate is projected onto what can be stored: zero rounded
  to an integer in ``[0, 2^b - 1]``, the scale refitted to it (``s = <q - z, t> / ||q - z||^2``). It
  starts from round-to-nearest's own parameters. Symmetric schemes have no zero point; for them only
  the scale is optimised.

With ``early_stop`` (the hqq package's rule) the iterations end once the tensor's mean absolute
error stops falling. Every candidate is cast to the stored dtypes before it is judged, and each group keeps the one with the
smallest squared weight error seen so far, iteration 0 (the starting point) included: the result is
never worse than its start in that error, group by group (for integer zeros: never worse than RTN).

Output: the same ``AffineQuantized`` (codes, scale, zero, group_size) as :func:`quantize_affine`, so it
packs into a normal QuantLinear.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..config import Granularity, QuantScheme
from ..errors import NumericError
from .affine import AffineQuantized, _sanitize_scale, check_finite, compute_qparams, effective_group_size, num_groups

# defaults of the paper and the hqq package (optimize_weights_proximal)
LP_NORM, BETA, KAPPA, ITERS = 0.7, 10.0, 1.01, 20


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of ``|x|^p / beta`` (generalised soft-thresholding), elementwise."""
    a = x.abs()
    if p == 1:
        return torch.sign(x) * (a - 1.0 / beta).clamp_min(0)
    # |x|^(p-1) is inf at 0 for p < 1: the threshold then exceeds |x| and the result is 0, as it should be
    return torch.sign(x) * (a - a.pow(p - 1) / beta).clamp_min(0)


def _groups(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(N, K) -> values (N, G, gs) zero-padded and a 0/1 mask of real entries, and the group length."""
    n, k = w.shape
    if scheme.granularity is Granularity.TENSOR:
        return w.reshape(1, 1, n * k), torch.ones(1, 1, n * k, dtype=w.dtype, device=w.device), k
    gs = effective_group_size(scheme, k)
    g = num_groups(k, gs)
    pad = g * gs - k
    mask = torch.ones(n, k, dtype=w.dtype, device=w.device)
    if pad:
        w, mask = F.pad(w, (0, pad)), F.pad(mask, (0, pad))
    return w.reshape(n, g, gs), mask.reshape(n, g, gs), gs


def hqq_qparams(
    w: torch.Tensor,
    scheme: QuantScheme,
    *,
    lp_norm: float = LP_NORM,
    beta: float = BETA,
    kappa: float = KAPPA,
    iters: int = ITERS,
    optimize_scale: bool = True,
    round_zero: bool = True,
    early_stop: bool = True,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """HQQ scales (and integer zero points) of a 2-D weight ``(N, K)``: ``(scale, zero, group_size)``
    shaped like :func:`~torchcompress.primitives.affine.compute_qparams`'s (``(N, G)`` or ``(1, 1)``)."""
    if w.dim() != 2:
        raise NumericError(name, f"must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    check_finite(w, name)
    if not 0 < lp_norm <= 1 or beta <= 0 or kappa < 1 or iters < 0:
        raise ValueError(f"hqq_qparams: need 0 < lp_norm <= 1, beta > 0, kappa >= 1, iters >= 0 "
                         f"(got {lp_norm}, {beta}, {kappa}, {iters})")
    if scheme.symmetric and not optimize_scale:
        raise ValueError("hqq_qparams: a symmetric scheme has no zero point; HQQ needs optimize_scale=True for it")
    wf = w.detach().float()
    x, mask, _ = _groups(wf, scheme)  # (N, G, gs)
    cnt = mask.sum(-1, keepdim=True)  # real entries per group
    padded = bool((mask == 0).any())  # only a partial last group needs the mask in the sums
    qmax = (1 << scheme.bits) - 1
    half = float(1 << (scheme.bits - 1))
    dt = scheme.torch_scale_dtype
    fz = scheme.float_zero
    gs_out = effective_group_size(scheme, wf.shape[1])  # what compute_qparams reports, TENSOR included

    def m(v):  # zero the padding of a partial last group (x is 0 there; q - z and errors need not be)
        return v * mask if padded else v

    def masked_mean(v):
        return m(v).sum(-1, keepdim=True) / cnt

    def codes(s, z):
        if z is None:
            return torch.round(x / s).clamp(-half, half - 1) + half
        return torch.round(x / s + z).clamp(0, qmax)

    def error(s, z):  # squared weight error per group (N, G, 1), and the codes
        q = codes(s, z)
        return m(((q - (half if z is None else z)) * s - x).square()).sum(-1, keepdim=True), q

    def fit_scale(q, t, z):  # least-squares s for t ~ (q - z) s, and its denominator (0: undefined)
        qc = m(q - z)
        den = qc.square().sum(-1, keepdim=True)
        return (qc * t).sum(-1, keepdim=True) / den.clamp_min(1e-30), den

    # round-to-nearest's own parameters (integer zero, range holding 0): the start for integer zeros,
    # and for float zeros a candidate too (an integer is a float zero), so neither mode ends worse than RTN
    s0, z0, _ = compute_qparams(wf, replace(scheme, float_zero=False))
    s = s0.float().unsqueeze(-1)
    z = None if z0 is None else z0.float().unsqueeze(-1)
    best_s, best_z = s, z
    best_e, _ = error(s, z)
    q_next = None  # codes of the current (s, z) when the last error() computed them
    prev_l1 = float("inf")
    if fz:  # start from min/max with a float zero (the hqq package's initialisation)
        mn = torch.where(mask > 0, x, torch.full_like(x, float("inf"))).amin(-1, keepdim=True)
        mx = torch.where(mask > 0, x, torch.full_like(x, float("-inf"))).amax(-1, keepdim=True)
        s = _sanitize_scale((mx - mn) / qmax, dt).float()
        z = -mn / s
        z = (z.round() if round_zero else z).to(dt).float()  # hqq rounds this start at 4 bits (round_zero)
        e, q_next = error(s, z)
        better = e < best_e
        best_e, best_s, best_z = torch.where(better, e, best_e), torch.where(better, s, best_s), torch.where(better, z, best_z)
    for _ in range(iters):
        q = codes(s, z) if q_next is None else q_next
        zz = half if z is None else z
        r = m(x - (q - zz) * s)  # (N, G, gs) the current weight error
        if early_stop:  # the hqq package's rule: stop once the mean |error| of the tensor stops falling
            cur = float(r.abs().mean())
            if cur >= prev_l1:
                break
            prev_l1 = cur
        w_e = shrink_lp(r, beta, lp_norm)
        t = x - w_e  # (N, G, gs): what the dequantized group should reproduce
        if optimize_scale:
            if z is None:  # fixed zero 2^(b-1)
                s_new, den = fit_scale(q, t, half)
            else:  # least-squares slope of t on q
                s_new, den = fit_scale(q, t - masked_mean(t), masked_mean(q))
            s = torch.where((den > 0) & (s_new > 0) & torch.isfinite(s_new), s_new, s)
        if z is not None:
            z = masked_mean(q - t / s)  # the paper's zero update
            if not fz:
                z = z.clamp(0, qmax)
        beta *= kappa
        # the stored candidate
        cs, cz = s, z
        if z is not None and not fz:  # integer zero, scale refitted to it
            cz = z.round()
            refit, den = fit_scale(q, t, cz)
            cs = torch.where((den > 0) & (refit > 0) & torch.isfinite(refit), refit, s)
        cs = _sanitize_scale(cs, dt).float()
        if fz:
            cz = cz.to(dt).float()
            z = cz  # keep iterating from what is stored (fp16 zeros of large groups would drift)
        e, q_e = error(cs, cz)
        # float zeros with a fixed scale: the candidate is the next iterate, whose codes these are
        q_next = q_e if fz and not optimize_scale else None
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, cs, best_s)
        if cz is not None:
            best_z = torch.where(better, cz, best_z)
    scale = best_s.squeeze(-1).to(dt)
    zero = None if best_z is None else best_z.squeeze(-1).to(dt if fz else torch.uint8)
    return scale, zero, gs_out


def quantize_hqq(w: torch.Tensor, scheme: QuantScheme, name: str = "weight", **opts) -> AffineQuantized:
    """HQQ-quantize a 2-D weight ``(N, K)`` into the layout of :func:`quantize_affine`.

    >>> q = quantize_hqq(torch.randn(8, 64), QuantScheme(bits=4, group_size=32, symmetric=False))
    >>> q.codes.shape, q.scale.shape, q.zero.dtype
    (torch.Size([8, 64]), torch.Size([8, 2]), torch.uint8)
    """
    from .affine import quantize_with_qparams

    scale, zero, gs = hqq_qparams(w, scheme, name=name, **opts)
    codes = quantize_with_qparams(w, scale, zero, scheme.bits, gs)
    return AffineQuantized(codes=codes, scale=scale, zero=zero, group_size=gs)
