"""Sign-gradient rounding (SignRound, Cheng et al. 2023, the idea behind Intel's AutoRound): pure math.

A weight ``W`` (N, K) is fake-quantized with three learnable tensors:

* ``v`` (N, K) in [-0.5, 0.5]: an offset added before rounding, ``code = round(W / s + v)``, so each
  weight may round up or down instead of to nearest (|v| <= 0.5 moves a code by at most one step);
* ``hi`` (N, G) and, for asymmetric schemes, ``lo`` (N, G) in [0.5, 1]: per-group clip factors of the
  range, ``max' = hi * max(W_g, 0)``, ``min' = lo * min(W_g, 0)`` (symmetric: ``max|W_g|' = hi * max|W_g|``).

Scales and zero points follow :func:`~.affine.compute_qparams` from the clipped range (the scale is
cast to the scheme's scale dtype before the codes are computed, as the packed layer stores it), so
with ``v = 0``, ``hi = lo = 1`` the result is exactly round-to-nearest. ``round`` has a
straight-through gradient (identity), so the loss reaches ``v`` and, through the scale and zero
point, the clip factors. :class:`SignSGD` updates them by ``p -= lr_t * sign(grad)`` with
``lr_t = lr * (1 - t / iters)`` (linear decay to 0, AutoRound's schedule) and clamps them to their
intervals. :func:`quantize_signround` gives the packed codes of the same computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Granularity, QuantScheme
from ..errors import ConfigError
from .affine import AffineQuantized, check_finite, effective_group_size, num_groups

V_BOUND = 0.5  # |v| <= 0.5: the rounding moves at most one step from nearest
CLIP_MIN = 0.5  # clip factors in [0.5, 1]: the range may shrink to half


@dataclass
class SignRoundParams:
    """The learnable tensors of one weight (float32, on the weight's device)."""

    v: torch.Tensor  # (N, K) rounding offsets
    hi: torch.Tensor  # (N, G) clip factor of the max (symmetric: of max|w|)
    lo: torch.Tensor | None  # (N, G) clip factor of the min; None for symmetric schemes

    def tensors(self) -> list[torch.Tensor]:
        return [self.v, self.hi] + ([] if self.lo is None else [self.lo])

    def bounds(self) -> list[tuple[float, float]]:
        return [(-V_BOUND, V_BOUND), (CLIP_MIN, 1.0)] + ([] if self.lo is None else [(CLIP_MIN, 1.0)])

    def clone(self) -> "SignRoundParams":
        return SignRoundParams(*(None if t is None else t.detach().clone() for t in (self.v, self.hi, self.lo)))


def check_scheme(scheme: QuantScheme, field: str = "scheme") -> None:
    if scheme.granularity is Granularity.TENSOR:
        raise ConfigError(f"{field}.granularity", "sign-gradient rounding needs per-group or per-channel scales, got tensor")
    if scheme.float_zero:
        raise ConfigError(f"{field}.float_zero", "sign-gradient rounding learns integer zero points; set float_zero: false")


def init_params(w: torch.Tensor, scheme: QuantScheme) -> SignRoundParams:
    """Round-to-nearest's parameters: ``v = 0``, clip factors 1."""
    check_scheme(scheme)
    n, k = w.shape
    g = num_groups(k, effective_group_size(scheme, k))
    ones = torch.ones(n, g, dtype=torch.float32, device=w.device)
    return SignRoundParams(torch.zeros(n, k, dtype=torch.float32, device=w.device), ones,
                           None if scheme.symmetric else ones.clone())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _grouped(t: torch.Tensor, gs: int) -> torch.Tensor:
    """(N, K) -> (N, G, gs), zero-padding a partial last group (differentiable)."""
    n, k = t.shape
    pad = num_groups(k, gs) * gs - k
    return (F.pad(t, (0, pad)) if pad else t).reshape(n, -1, gs)


def _sanitize(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`~.affine.sanitize_scale` with a gradient (the cast's gradient is the identity)."""
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    info = torch.finfo(dtype)
    low = 2.0**-24 if dtype == torch.float16 else info.tiny
    return scale.clamp(min=low, max=info.max).to(dtype).float()


def _qparams(wg: torch.Tensor, p: SignRoundParams, scheme: QuantScheme):
    """Clipped scales (N, G) float32 (values of the scale dtype) and zero points (N, G) float or None."""
    qmax = (1 << scheme.bits) - 1
    if scheme.symmetric:
        amax = wg.abs().amax(dim=-1) * p.hi
        return _sanitize(amax / ((1 << (scheme.bits - 1)) - 1), scheme.torch_scale_dtype), None
    wmin = wg.amin(dim=-1).clamp(max=0) * p.lo
    wmax = wg.amax(dim=-1).clamp(min=0) * p.hi
    scale = _sanitize((wmax - wmin) / qmax, scheme.torch_scale_dtype)
    zero = round_ste(-wmin / scale).clamp(0, qmax)
    return scale, zero


def _codes_and_dequant(w: torch.Tensor, p: SignRoundParams, scheme: QuantScheme):
    """(codes (N, G, gs) float, dequantized (N, K) float32), both differentiable."""
    n, k = w.shape
    gs = effective_group_size(scheme, k)
    wg = _grouped(w.float(), gs)  # (N, G, gs)
    scale, zero = _qparams(wg, p, scheme)
    s = scale.unsqueeze(-1)
    q = round_ste(wg / s + _grouped(p.v, gs))
    if zero is None:
        half = 1 << (scheme.bits - 1)
        codes = q.clamp(-half, half - 1) + half
        w_hat = (codes - half) * s
    else:
        z = zero.unsqueeze(-1)
        codes = (q + z).clamp(0, (1 << scheme.bits) - 1)
        w_hat = (codes - z) * s
    return codes, w_hat.reshape(n, -1)[:, :k], scale, zero, gs


def fake_quant(w: torch.Tensor, p: SignRoundParams, scheme: QuantScheme) -> torch.Tensor:
    """The dequantized weight (N, K) float32 of ``w`` under ``p``; gradients reach ``p`` (straight-through round)."""
    return _codes_and_dequant(w, p, scheme)[1]


@torch.no_grad()
def quantize_signround(w: torch.Tensor, p: SignRoundParams, scheme: QuantScheme, name: str = "weight") -> AffineQuantized:
    """The codes, scales and zero points of :func:`fake_quant` (``dequantize_affine`` of them equals it)."""
    check_finite(w, name)
    n, k = w.shape
    codes, _, scale, zero, gs = _codes_and_dequant(w, p, scheme)
    codes = codes.reshape(n, -1)[:, :k].to(torch.uint8)
    return AffineQuantized(codes=codes, scale=scale.to(scheme.torch_scale_dtype),
                           zero=None if zero is None else zero.to(torch.uint8), group_size=gs)


class SignSGD:
    """Signed gradient descent with a linearly decaying step: ``p -= lr * (1 - t / iters) * sign(grad)``,
    then ``p`` clamped to its interval. ``step(grads)`` takes the gradients of ``params`` in order."""

    def __init__(self, params: list[torch.Tensor], bounds: list[tuple[float, float]], lr: float, iters: int):
        if len(params) != len(bounds):
            raise ValueError("SignSGD: one (low, high) bound per parameter")
        self.params, self.bounds, self.lr, self.iters, self.t = params, bounds, lr, iters, 0

    def current_lr(self) -> float:
        return self.lr * (1.0 - self.t / self.iters) if self.iters else 0.0

    @torch.no_grad()
    def step(self, grads) -> None:
        lr = self.current_lr()
        for p, g, (lo, hi) in zip(self.params, grads, self.bounds):
            if g is not None:
                p.sub_(torch.sign(g), alpha=lr).clamp_(lo, hi)
        self.t += 1
