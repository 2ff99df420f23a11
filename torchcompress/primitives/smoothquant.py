"""SmoothQuant's smoothing factors (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models").

For a linear ``Y = X W^T`` and input channel j: ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``
(``max|W_j|`` over the output rows of every linear that reads X). Then ``X' = X / s`` and
``W' = W * s`` (column j times s_j) compute the same Y, with activation outliers (large
``max|X_j|``) moved into the weights. ``alpha`` is the migration strength: 0 leaves the activations
alone, 1 flattens them completely. A channel with no activation or no weight (max 0) gets s = 1.

Example::

    s = smoothing_scales(act_absmax, weight_absmax(q.weight, k.weight, v.weight), alpha=0.5)   # (K,)
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, NumericError

_FLOOR = 1e-5  # the paper's clamp: keeps s finite for near-dead channels


def weight_absmax(*weights: torch.Tensor) -> torch.Tensor:
    """Per input column max |W| over all rows of all ``weights`` (each (N_i, K)) -> (K,) fp32."""
    return torch.cat([w.detach().float().abs() for w in weights], dim=0).amax(dim=0)


def smoothing_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, name: str = "activations") -> torch.Tensor:
    """(K,) activation maxima, (K,) weight maxima -> (K,) fp32 smoothing factors."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError("alpha", f"must be in [0, 1], got {alpha!r}")
    a, w = act_absmax.float().flatten(), w_absmax.float().flatten()
    if a.shape != w.shape:
        raise ConfigError(name, f"{a.numel()} activation statistics for {w.numel()} weight columns")
    if not bool(torch.isfinite(a).all()):
        raise NumericError(name, "activation statistics hold NaN/Inf")
    s = a.clamp(min=_FLOOR).pow(alpha) / w.clamp(min=_FLOOR).pow(1.0 - alpha)
    return torch.where((a > 0) & (w > 0), s.clamp(min=_FLOOR), torch.ones_like(s))
