"""Forwards of the weight-and-activation schemes (FP8 W8A8, INT8 W8A8, NVFP4, MXFP4).

Each has a pure-PyTorch reference that runs anywhere: quantize-dequantize the activations the way the
serving kernel quantizes them (dynamic, per token or per block), dequantize the weight, then
``F.linear`` in fp32. FP8 per-channel weights with per-token activations also have a fast path:
``torch._scaled_mm`` (row-wise scales) on a GPU with FP8 tensor cores (compute capability >= 8.9);
``TORCHCOMPRESS_KERNEL=reference`` forces the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..primitives.fp4 import dequantize_mxfp4, dequantize_nvfp4, mxfp4_qdq, nvfp4_qdq
from ..primitives.fp8 import dequantize_fp8, fp8_qdq_per_token
from ..primitives.int8 import int8_qdq_per_token
from .backend import Backend, selected_backend


def _linear(x_hat: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = F.linear(x_hat, w, None if bias is None else bias.float())
    return out.to(dtype)


FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada, Hopper and later


def has_fp8_matmul(device: torch.device) -> bool:
    """True on a CUDA device with FP8 tensor cores (Ada / Hopper and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def fp8_kernel(device_type: str, capability: Optional[tuple[int, int]], weight_shape: tuple[int, int],
               block: Optional[tuple[int, int]], act_dynamic: bool, backend: Backend) -> str:
    """Which FP8 W8A8 path runs: ``"scaled_mm_rowwise"`` (``torch._scaled_mm`` with the scheme's
    per-token activation scales (M, 1) and per-channel weight scales (1, N)) on CUDA devices of
    compute capability >= 8.9, or ``"reference"`` (dequantize, fp32 F.linear). Block-scaled weights
    (128x128) and weight-only FP8 take the reference; ``_scaled_mm`` wants N and K multiples of 16.
    Pure: the caller passes the device's capability, so every branch is testable anywhere."""
    n, k = weight_shape
    if (backend is Backend.AUTO and device_type == "cuda" and capability is not None
            and tuple(capability) >= FP8_MIN_CAPABILITY and act_dynamic and block is None
            and n % 16 == 0 and k % 16 == 0 and hasattr(torch, "_scaled_mm")):
        return "scaled_mm_rowwise"
    return "reference"


def fp8_scaled_mm_rowwise(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    """FP8 W8A8 through ``torch._scaled_mm``: x quantized per token to e4m3 (the reference's own
    quantizer), fp32 accumulation, bf16 out (the row-wise-scaled GEMM's output type), then x's dtype."""
    xq, xs, _ = fp8_qdq_per_token(x.reshape(-1, x.shape[-1]))  # (M, K) fp8, (M, 1) fp32
    out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.float().reshape(1, -1),
                           out_dtype=torch.bfloat16)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
               block: Optional[tuple[int, int]], act_dynamic: bool) -> torch.Tensor:
    """y = x @ (q_w * s_w)^T + b with x quantized per token (per token and 128-group for block
    weights) when ``act_dynamic``; weight-only otherwise. ``weight`` (N, K) float8_e4m3fn."""
    cap = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
    if fp8_kernel(x.device.type, cap, tuple(weight.shape), block, act_dynamic, selected_backend()) == "scaled_mm_rowwise":
        return fp8_scaled_mm_rowwise(x, weight, weight_scale, bias)
    w = dequantize_fp8(weight, weight_scale, block)
    if not act_dynamic:
        return _linear(x.float(), w, bias, x.dtype)
    _, _, x_hat = fp8_qdq_per_token(x, None if block is None else block[1])
    return _linear(x_hat, w, bias, x.dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """INT8 W8A8: int8 per-channel weights, int8 per-token dynamic activations."""
    _, _, x_hat = int8_qdq_per_token(x)
    return _linear(x_hat, weight.float() * weight_scale.float(), bias, x.dtype)


def nvfp4_linear(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                 weight_global_scale: torch.Tensor, input_global_scale: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    w = dequantize_nvfp4(weight_packed, weight_scale, weight_global_scale)
    x_hat = x.float() if input_global_scale is None else nvfp4_qdq(x, input_global_scale)
    return _linear(x_hat, w, bias, x.dtype)


def mxfp4_linear(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, act: bool,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    w = dequantize_mxfp4(weight_packed, weight_scale)
    x_hat = mxfp4_qdq(x) if act else x.float()
    return _linear(x_hat, w, bias, x.dtype)
