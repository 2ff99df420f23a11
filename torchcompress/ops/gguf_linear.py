"""``torchcompress::gguf_linear``: y = x @ dequant(blocks)^T + bias for ggml block-quantized weights.

The weight stays in ggml's bytes (``blocks``: (N, row_bytes) uint8, one row per output feature);
the reference implementation dequantizes them with :mod:`~torchcompress.primitives.gguf_blocks` and
calls ``F.linear``. Declared as a custom op with a fake implementation (``torch.compile`` traces
through it) and an autograd formula for the activation gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..primitives.gguf_blocks import dequantize
from .backend import Backend, selected_backend
from .fastpath import gguf_linear_fast


def dequantize_rows(blocks: torch.Tensor, qtype: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, row_bytes) uint8 -> dense (N, K) weight in ``dtype``."""
    return dequantize(blocks, qtype, (blocks.shape[0], in_features)).to(dtype)


def gguf_linear_impl(x: torch.Tensor, blocks: torch.Tensor, bias: Optional[torch.Tensor], qtype: int, in_features: int) -> torch.Tensor:
    if selected_backend() is Backend.AUTO:  # fast kernels (ops/fastpath.py), else the reference
        out = gguf_linear_fast(x.detach(), blocks, None if bias is None else bias.detach(), qtype, in_features)  # see int_linear
        if out is not None:
            return out
    w = dequantize_rows(blocks, qtype, in_features, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


gguf_linear = torch.library.custom_op("torchcompress::gguf_linear", mutates_args=())(gguf_linear_impl)


@gguf_linear.register_fake
def _(x, blocks, bias, qtype, in_features):
    return x.new_empty(*x.shape[:-1], blocks.shape[0])


def _setup_context(ctx, inputs, output):
    x, blocks, bias, qtype, in_features = inputs
    ctx.save_for_backward(blocks)
    ctx.meta = (qtype, in_features, x.dtype, bias is not None)


def _backward(ctx, grad_out):
    (blocks,) = ctx.saved_tensors
    qtype, in_features, dtype, has_bias = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad_out @ dequantize_rows(blocks, qtype, in_features, grad_out.dtype)).to(dtype)
    if has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, grad_bias, None, None


gguf_linear.register_autograd(_backward, setup_context=_setup_context)
