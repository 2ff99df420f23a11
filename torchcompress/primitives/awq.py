"""AWQ's math (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): per input channel scales searched on calibration activations, and the weight-clip search.

For linears ``Y = X W^T`` that read one input X, AWQ multiplies column j of every W by ``s_j`` and
divides channel j of X by ``s_j`` (folded into whatever produced X): the float function is the same,
but the quantizer now sees ``W * s``, so channels with large activations lose less to rounding. The
scales come from a grid over the exponent ``alpha``::

    s = x_mean^alpha / (w_mean^(1 - alpha) + 1e-4),  clamped at 1e-4,  s /= sqrt(max(s) * min(s))

``x_mean``: mean |X_j| over the calibration tokens; ``w_mean``: per column mean over all rows of the
linears of ``|W| / max|W|`` within each quantization group (the normalised weight magnitude). The grid
(as llm-compressor's default ``duo_scaling``): ``s = 1`` (plain round-to-nearest) and ``alpha = i / (n-2)``
for ``i = 0 .. n-2``, ``n`` points in all; the one whose quantized output is closest to the float
output wins, so the search never does worse than plain rounding on its own loss.

The clip search (AutoAWQ's ``auto_clip``): per output row and quantization group, shrink the range
``max|w|`` by ``1 - i / n`` for ``i < max_shrink * n``, clamp the group to ``[-m, m]``, and keep the
shrink whose quantized partial output ``x_g . w_g`` is closest to the float one over the calibration
tokens. With ``H = sum_t x_t x_t^T`` that error is ``dw_g H_gg dw_g^T`` (``H_gg``: the group's
diagonal block), computed here from the block (exact, every token) instead of a token subsample.

Example::

    s = awq_scales(x_mean, weight_mean([q.weight, k.weight, v.weight], 128), alpha=0.5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Granularity, QuantScheme
from ..errors import ConfigError
from .affine import compute_qparams, dequantize_affine, effective_group_size, quantize_with_qparams

_EPS_W = 1e-4  # AutoAWQ's / llm-compressor's constants: keep the division and the scales finite
_FLOOR = 1e-4


def alpha_grid(n: int) -> list[float | None]:
    """The ``n`` candidates of the scale search: ``None`` (s = 1) then ``alpha = i / (n - 2)``, ``i = 0 .. n - 2``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError("grid", f"needs at least 2 points (s = 1 and one alpha), got {n!r}")
    return [None] + [i / (n - 2) if n > 2 else 1.0 for i in range(n - 1)]


def weight_mean(weights: list[torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """(K,) per column mean over every row of ``weights`` (each (N_i, K)) of ``|W|`` divided by its
    quantization group's max |W| (the row for per-channel, the tensor for per-tensor schemes)."""
    total, rows = None, 0
    for w in weights:
        a = w.detach().float().abs()  # (N, K)
        n, k = a.shape
        if scheme.granularity is Granularity.TENSOR:
            a = a / (a.amax() + 1e-6)
        else:
            gs = effective_group_size(scheme, k)
            g = -(-k // gs)
            p = F.pad(a, (0, g * gs - k)).view(n, g, gs)
            a = (p / (p.amax(dim=-1, keepdim=True) + 1e-6)).view(n, g * gs)[:, :k]
        s = a.sum(0, dtype=torch.float64)
        total = s if total is None else total + s
        rows += n
    return (total / rows).float()


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """(K,) scales for one grid point (``alpha`` None: all ones)."""
    if alpha is None:
        return torch.ones_like(x_mean, dtype=torch.float32)
    s = (x_mean.float().pow(alpha) / (w_mean.float().pow(1.0 - alpha) + _EPS_W)).clamp(min=_FLOOR)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def fake_quant(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Round-to-nearest ``dequantize(quantize(w))`` as float32 (the quantizer the search assumes)."""
    s, z, gs = compute_qparams(w, scheme)
    return dequantize_affine(quantize_with_qparams(w, s, z, scheme.bits, gs), s, z, scheme.bits, gs)


def scaled_weight(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W * s`` (columns) in ``w``'s dtype: what the fold stores and what the search quantizes."""
    return (w.float() * s).to(w.dtype)


def searched_weight(w: torch.Tensor, s: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``Q(W * s) / s`` in ``w``'s dtype: applied to the unscaled X it gives ``Q(W * s) (X / s)``."""
    return (fake_quant(scaled_weight(w, s), scheme) / s).to(w.dtype)


def hessian_output_error(dw: torch.Tensor, h: torch.Tensor) -> float:
    """``sum_t ||dw x_t||^2 = trace(dw H dw^T)`` for ``H = sum_t x_t x_t^T`` (K, K): a linear's squared
    output error over the calibration tokens without running them."""
    dw = dw.float()
    return float(((dw @ h.float()) * dw).sum(dtype=torch.float64))


def clip_search(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, *, grid: int = 20, max_shrink: float = 0.5
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight clip search: returns ``(clamped w, shrink chosen per (row, group))``.

    ``w`` (N, K), ``h`` = ``sum_t x_t x_t^T`` (K, K) of the inputs ``w`` sees. Per output row and
    quantization group the max |w| is shrunk by ``1 - i / grid``, ``i = 0 .. int(max_shrink * grid) - 1``
    (``i = 0``: no clip), the group clamped to ``[-m, m]`` and quantized; the shrink with the least
    ``dw_g H_gg dw_g^T`` (the group's partial output error against the float weight) wins."""
    if scheme.granularity is Granularity.TENSOR:
        raise ConfigError("clip", "the clip search needs per-group or per-channel scales (per-tensor has one range)")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise ConfigError("clip_grid", f"needs grid >= 1 and 0 <= max_shrink < 1 (got {grid!r}, {max_shrink!r})")
    wf = w.detach().float()
    n, k = wf.shape
    gs = effective_group_size(scheme, k)
    g = -(-k // gs)
    pad = g * gs - k
    hp = F.pad(h.float(), (0, pad, 0, pad))  # (G*gs, G*gs); padded columns have w = 0, dw = 0
    hb = torch.stack([hp[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs] for i in range(g)])  # (G, gs, gs)
    wg = F.pad(wf, (0, pad)).view(n, g, gs)
    amax = wg.abs().amax(dim=-1, keepdim=True)  # (N, G, 1)
    best_err = torch.full((n, g), float("inf"))
    best_m = amax.clone()
    steps = max(1, int(max_shrink * grid))
    for i in range(steps):
        m = amax * (1 - i / grid)
        wc = torch.minimum(torch.maximum(wg, -m), m).view(n, g * gs)[:, :k]
        dw = F.pad(fake_quant(wc, scheme) - wf, (0, pad)).view(n, g, gs)
        err = torch.einsum("ngi,gij,ngj->ng", dw, hb, dw)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_m = torch.where(better.unsqueeze(-1), m, best_m)
    out = torch.minimum(torch.maximum(wg, -best_m), best_m).view(n, g * gs)[:, :k]
    return out.to(w.dtype), (best_m / amax.clamp(min=torch.finfo(torch.float32).tiny)).squeeze(-1)
