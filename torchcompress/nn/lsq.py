"""Learned step size quantization (LSQ, Esser et al. 2020) for QAT: the scales are parameters too.

Forward (asymmetric; symmetric drops ``z`` and uses signed codes)::

    w_hat = (clamp(round(w / s) + z, 0, 2^b - 1) - z) * s

with ``round`` a straight-through estimator, so

* d w_hat / d w = 1 where the code was not clamped, 0 where it was (the clipped STE);
* d w_hat / d s = round(w/s) - w/s inside the range, the clamp bound (minus z) outside (LSQ eq. 3);
* the scale's gradient is multiplied by ``g = 1 / sqrt(n * Q_P)`` (LSQ section 2.2) with ``n`` the
  number of weights sharing that scale and ``Q_P`` the largest positive code level, so the step
  size's updates stay commensurate with the weights' updates.

The forward uses the scale rounded to the scheme's scale dtype (float16 by default), so the packed
layer after :meth:`QuantLinear.freeze` computes exactly what training saw.
"""

from __future__ import annotations

import math

import torch

from ..config import QuantScheme


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value of ``x``, gradient multiplied by ``g``."""
    y = x * g
    return y + (x - y).detach()


def lsq_positive_level(scheme: QuantScheme) -> int:
    return (1 << (scheme.bits - 1)) - 1 if scheme.symmetric else (1 << scheme.bits) - 1


def lsq_fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme,
                      group_size: int) -> torch.Tensor:
    """``w`` (N, K); ``scale`` (N, G) or (1, 1) float parameter; ``zero`` same shape (integer values) or None."""
    n, k = w.shape
    per_scale = n * k if scale.shape == (1, 1) else group_size
    g = 1.0 / math.sqrt(per_scale * lsq_positive_level(scheme))
    s = _grad_scale(scale.float(), g)
    s = s + (s.to(scheme.torch_scale_dtype).float() - s).detach()  # compute with the stored precision

    def expand(p):
        return p.expand(n, k) if p.shape == (1, 1) else p.repeat_interleave(group_size, dim=1)[:, :k]

    s_full = expand(s)
    v = _round_ste(w.float() / s_full)
    if zero is None:
        half = 1 << (scheme.bits - 1)
        q = torch.clamp(v, -half, half - 1)
    else:
        z = expand(zero.float())
        q = torch.clamp(v + z, 0, (1 << scheme.bits) - 1) - z
    return (q * s_full).to(w.dtype)
