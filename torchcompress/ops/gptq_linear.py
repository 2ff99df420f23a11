"""``torchcompress::gptq_linear``: y = x @ dequant(qweight, g_idx)^T + bias, any column -> group map.

GPTQ with act-order quantizes columns in a data-dependent order, so column ``k`` belongs to group
``g_idx[k]`` (not ``k // group_size``). Same shape of declaration as :mod:`.int_linear`: a custom
op with a fake implementation (``torch.compile``), an activation-gradient formula, the pure-PyTorch
reference, and fast kernels (:func:`~torchcompress.ops.fastpath.gptq_linear_fast`):

* ``g_idx == arange(K) // group_size``: the int_linear kernels on ``qweight`` as it is;
* act-order: the caller passes the columns sorted by group once (``perm``, ``qweight_sorted``
  from :func:`~torchcompress.primitives.act_order.sort_by_group`; GPTQLinear caches them) and the
  int_linear kernels run on ``x[..., perm]`` and the sorted codes: the same products, reordered.

``group_size`` (the kernel group size, cached by GPTQLinear with the layout) spares the fast path
reading ``g_idx`` back from the device on every call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..primitives.gptq import dequantize_with_g_idx
from ..primitives.packing import unpack
from .backend import Backend, selected_backend
from .fastpath import gptq_linear_fast


def dequantize_g_idx_packed(qweight, scale, zero, g_idx, bits: int, in_features: int, dtype) -> torch.Tensor:
    """Packed (N, ceil(K*b/8)) uint8 + g_idx (K,) -> dense (N, K) weight in ``dtype``."""
    return dequantize_with_g_idx(unpack(qweight, bits, in_features), scale, zero, g_idx, bits, dtype)


def gptq_linear_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    g_idx: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    in_features: int,
    perm: Optional[torch.Tensor] = None,
    qweight_sorted: Optional[torch.Tensor] = None,
    group_size: int = 0,
) -> torch.Tensor:
    # detached: the native kernels' worker threads do not inherit autograd state; the gradient comes from _backward
    if selected_backend() is Backend.AUTO:
        out = gptq_linear_fast(x.detach(), qweight, scale, zero, g_idx, None if bias is None else bias.detach(),
                               bits, in_features, perm, qweight_sorted, group_size)
        if out is not None:
            return out
    w = dequantize_g_idx_packed(qweight, scale, zero, g_idx, bits, in_features, x.dtype)  # (N, K)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


gptq_linear = torch.library.custom_op("torchcompress::gptq_linear", mutates_args=())(gptq_linear_impl)


@gptq_linear.register_fake
def _(x, qweight, scale, zero, g_idx, bias, bits, in_features, perm=None, qweight_sorted=None, group_size=0):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _setup_context(ctx, inputs, output):
    x, qweight, scale, zero, g_idx, bias, bits, in_features = inputs[:8]
    ctx.save_for_backward(qweight, scale, zero, g_idx)
    ctx.meta = (bits, in_features, x.dtype, bias is not None)


def _backward(ctx, grad_out):
    qweight, scale, zero, g_idx = ctx.saved_tensors
    bits, in_features, dtype, has_bias = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize_g_idx_packed(qweight, scale, zero, g_idx, bits, in_features, grad_out.dtype)
        grad_x = (grad_out @ w).to(dtype)
    if has_bias and ctx.needs_input_grad[5]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, None, None, None, grad_bias, None, None, None, None, None


gptq_linear.register_autograd(_backward, setup_context=_setup_context)
