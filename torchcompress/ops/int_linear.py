"""``torchcompress::int_linear``: y = x @ dequant(qweight)^T + bias for group-wise integer weights.

Declared once as a ``torch.library`` custom op with a fake (meta) implementation, so
``torch.compile`` traces through it, and an autograd formula for the activation gradient (LoRA on a
quantized base needs dL/dx; the packed weight itself is frozen).

Implementations: the pure-PyTorch reference below, and the fast kernels chosen in
:mod:`torchcompress.ops.fastpath` (native CPU extension, Triton on CUDA), which must match it.
``TORCHCOMPRESS_KERNEL=reference`` forces the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..primitives.affine import dequantize_affine
from ..primitives.packing import unpack
from .backend import Backend, selected_backend
from .fastpath import int_linear_fast


def dequantize_packed(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Packed (N, ceil(K*b/8)) uint8 -> dense (N, K) weight in ``dtype``."""
    codes = unpack(qweight, bits, in_features)  # (N, K) uint8
    return dequantize_affine(codes, scale, zero, bits, group_size, dtype)


def _reference(x, qweight, scale, zero, bias, bits, group_size, in_features):
    w = dequantize_packed(qweight, scale, zero, bits, group_size, in_features, x.dtype)  # (N, K)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def int_linear_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    qweight_kn: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    # qweight_kn: the K-major working copy of qweight (primitives/kernel_layout.py) for the CUDA tl.dot
    # kernel, or None; the result never depends on it.
    # selected_backend() validates TORCHCOMPRESS_KERNEL; AUTO tries the fast kernels (ops/fastpath.py)
    # and falls back to the reference where none applies.
    if selected_backend() is Backend.AUTO:
        # detached: the native kernel's worker threads do not inherit the below-autograd dispatch
        # state, so an x that requires grad (LoRA on a quantized base) made at::mm_out refuse it;
        # this op's gradient comes from _backward, never from tracing the kernel.
        out = int_linear_fast(x.detach(), qweight, scale, zero, None if bias is None else bias.detach(),
                              bits, group_size, in_features, qweight_kn)
        if out is not None:
            return out
    return _reference(x, qweight, scale, zero, bias, bits, group_size, in_features)


int_linear = torch.library.custom_op("torchcompress::int_linear", mutates_args=())(int_linear_impl)


@int_linear.register_fake
def _(x, qweight, scale, zero, bias, bits, group_size, in_features, qweight_kn=None):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _setup_context(ctx, inputs, output):
    x, qweight, scale, zero, bias, bits, group_size, in_features = inputs[:8]
    ctx.save_for_backward(qweight, scale, zero)
    ctx.meta = (bits, group_size, in_features, x.dtype, bias is not None)


def _backward(ctx, grad_out):
    qweight, scale, zero = ctx.saved_tensors
    bits, group_size, in_features, dtype, has_bias = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize_packed(qweight, scale, zero, bits, group_size, in_features, grad_out.dtype)
        grad_x = (grad_out @ w).to(dtype)  # (..., N) @ (N, K) -> (..., K)
    if has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias, None, None, None, None


int_linear.register_autograd(_backward, setup_context=_setup_context)
