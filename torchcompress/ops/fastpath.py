"""Fast-path selection for ``torchcompress::int_linear``.

:func:`int_linear_fast` returns the fast kernel's result, or ``None`` when no fast kernel applies, in
which case the op runs the pure-PyTorch reference. ``TORCHCOMPRESS_KERNEL=reference`` skips it.

* CPU: the native extension (:mod:`torchcompress.ops.native`) for 4- and 8-bit codes, and in
  :func:`gguf_linear_fast` for GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K; fp32, bf16 and fp16
  activations (computed in fp32, rounded once at the end).
* CUDA: Triton kernels (:mod:`torchcompress.ops.triton.int_linear`, and
  :mod:`torchcompress.ops.triton.gguf_linear` for GGUF Q4_0/Q5_0/Q8_0/Q4_K/Q6_K/IQ4_NL/IQ4_XS), imported
  on first CUDA call, one kernel per batch regime (GEMV, ``tl.dot``, dequantize + GEMM) chosen from the
  per-device crossovers of :mod:`torchcompress.ops.regimes`; GPTQ act-order goes through the int_linear kernels on sorted columns (both devices).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

CPU_BITS = (4, 8)
TRITON_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def int_linear_fast(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    qweight_kn: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    if x.dtype not in FLOAT_DTYPES or x.shape[-1] != in_features:
        return None
    dev = x.device.type
    if dev == "cpu" and bits in CPU_BITS and qweight.device.type == "cpu":
        if zero is not None and zero.dtype != torch.uint8:  # float zero points (HQQ): the native kernel reads uint8
            return None
        from .native import load_native

        ext = load_native()
        if ext is None:
            return None
        return ext.int_linear(x, qweight, scale, zero, bias, bits, group_size, in_features)
    if dev == "cuda" and bits in TRITON_BITS:
        from .triton.int_linear import triton_int_linear  # imports triton; CUDA only

        return triton_int_linear(x, qweight, scale, zero, bias, bits, group_size, in_features, qweight_kn=qweight_kn)
    return None


# ggml types with native CPU kernels (GGMLType values): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32-weight
# blocks) and Q4_K, Q5_K, Q6_K (256-weight super-blocks) -> weights per block
GGUF_CPU_BLOCK = {2: 32, 3: 32, 6: 32, 7: 32, 8: 32, 12: 256, 13: 256, 14: 256}
# Paths by rows of x (crossovers measured on 4096x4096 and 11008x4096 with one thread): the fused
# GEMV below GGUF_PANEL_MIN_BATCH[isa][block size] (legacy 32-weight types, K-quants; AVX2's GEMV
# takes 4 rows of x per pass, AVX-512's 8), the panel kernel (a few weight rows decoded into an L1
# panel, register-blocked over rows of x) up to GGUF_GEMV_MAX_BATCH, dequantized tiles + at::mm
# above. The portable code has no panel kernel of its own (its GEMV already dequantizes each row once).
GGUF_PANEL_MIN_BATCH = {"avx512": {32: 3, 256: 4}, "avx2": {32: 5, 256: 5}}
GGUF_GEMV_MAX_BATCH = 64


@functools.lru_cache(maxsize=None)
def _native_isa(ext) -> str:
    return ext.available_isas()[0]  # what isa="auto" runs


def gguf_panel_min_batch(ext, qtype: int) -> int:
    """Rows of x from which the native extension ``ext`` takes the panel path for ``qtype``."""
    block = GGUF_CPU_BLOCK[int(qtype)]
    return GGUF_PANEL_MIN_BATCH.get(_native_isa(ext), {}).get(block, GGUF_GEMV_MAX_BATCH + 1)


def gguf_linear_fast(
    x: torch.Tensor, blocks: torch.Tensor, bias: Optional[torch.Tensor], qtype: int, in_features: int
) -> Optional[torch.Tensor]:
    """``torchcompress::gguf_linear``'s fast kernel result, or ``None`` (the reference runs)."""
    if x.device.type == "cuda" and blocks.device == x.device and x.dtype in FLOAT_DTYPES:
        from .triton.gguf_linear import GGUF_TRITON_TYPES, triton_gguf_linear  # imports triton; CUDA only

        if int(qtype) in GGUF_TRITON_TYPES and in_features % GGUF_TRITON_TYPES[int(qtype)][0] == 0:
            return triton_gguf_linear(x, blocks, bias, int(qtype), in_features)
        return None
    block = GGUF_CPU_BLOCK.get(int(qtype))
    if (
        block is None
        or x.device.type != "cpu"
        or blocks.device.type != "cpu"
        or x.dtype not in FLOAT_DTYPES
        or in_features % block
        or x.shape[-1] != in_features
    ):
        return None
    from .native import load_native

    ext = load_native()
    if ext is None:
        return None
    panel_min = gguf_panel_min_batch(ext, qtype)
    return ext.gguf_linear(x, blocks, bias, int(qtype), in_features, "auto", "auto", GGUF_GEMV_MAX_BATCH, panel_min)


def gptq_linear_fast(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    g_idx: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    in_features: int,
    perm: Optional[torch.Tensor],
    qweight_sorted: Optional[torch.Tensor],
    group_size: int = 0,
) -> Optional[torch.Tensor]:
    """``torchcompress::gptq_linear`` through the int_linear kernels, or ``None`` (the reference runs).

    With ``perm``/``qweight_sorted`` (act-order columns sorted by group, see
    :mod:`torchcompress.primitives.act_order`): ``int_linear(x[..., perm], qweight_sorted)``.
    Without them only a sequential ``g_idx`` (``arange(K) // group_size``) is handled.
    ``group_size`` > 0: the kernel group size the caller computed once (GPTQLinear caches it with the
    sorted layout; without ``perm`` it vouches that ``g_idx`` is sequential), so nothing is read back
    from the device here (CUDA graphs, ``torch.compile``). 0: found from ``g_idx`` (a device sync)."""
    from ..primitives.act_order import sequential_group_size

    n_groups = scale.shape[1]
    if perm is not None and qweight_sorted is not None:
        if perm.device != x.device or x.shape[-1] != in_features:
            return None
        if group_size <= 0:  # as sort_by_group found it
            group_size = int((g_idx == 0).sum()) if n_groups > 1 else in_features
        return int_linear_fast(x.index_select(-1, perm), qweight_sorted, scale, zero, bias, bits, group_size, in_features)
    if group_size <= 0:
        group_size = sequential_group_size(g_idx, in_features, n_groups)
        if group_size is None:
            return None
    return int_linear_fast(x, qweight, scale, zero, bias, bits, group_size, in_features)
