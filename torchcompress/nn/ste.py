"""Fake quantization with a straight-through estimator (the QAT building block)."""

from __future__ import annotations

import torch

from ..config import QuantScheme
from ..primitives.affine import compute_qparams, dequantize_affine, quantize_with_qparams


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: dequant(quant(w)). Backward: identity where ``w / scale`` fell inside the code range,
    zero where the code was clamped (the clipped STE of Bengio et al. / LSQ). With RTN scales taken
    from each group's own range nothing is clamped, so the gradient passes through everywhere.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        scale, zero, gs = compute_qparams(w, scheme)
        codes = quantize_with_qparams(w, scale, zero, scheme.bits, gs)
        w_hat = dequantize_affine(codes, scale, zero, scheme.bits, gs, w.dtype)
        # a code at the edge of the range whose unrounded value lies beyond it was clipped
        n, k = w.shape
        s = scale.float().expand(n, 1) if scale.shape == (1, 1) else scale.float().repeat_interleave(gs, 1)[:, :k]
        qmax = (1 << scheme.bits) - 1
        if zero is None:
            raw = w.float() / s + (1 << (scheme.bits - 1))
        else:
            z = zero.float().expand(n, 1) if zero.shape == (1, 1) else zero.float().repeat_interleave(gs, 1)[:, :k]
            raw = w.float() / s + z
        inside = (raw >= -0.5) & (raw <= qmax + 0.5)
        ctx.save_for_backward(inside)
        return w_hat

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None


def fake_quantize_ste(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Differentiable fake quantization of a 2-D weight."""
    return _FakeQuantSTE.apply(w, scheme)
