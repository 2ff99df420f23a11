"""Triton dequant-matmul for ``torchcompress::gguf_linear``: ggml blocks Q4_0, Q5_0, Q8_0, IQ4_NL (32
weights) and Q4_K, Q6_K, IQ4_XS (256-weight super-blocks), read straight from the row bytes.

Same kernel family as :mod:`.int_linear`, one per batch regime chosen by the same dispatcher
(:mod:`torchcompress.ops.regimes`): a split-K GEMV reading each block once for up to 8 rows of x, a
pipelined ``tl.dot`` tile, and dequantize-once + ``F.linear`` above the crossover. Only the weight
tile differs: :func:`_gguf_tile` decodes each weight ``(n, k)`` from its block
``k // block`` of row ``n`` (fp16 ``d`` assembled from two bytes; the codes, 6-bit sub-block
scales and mins as ggml lays them out, see kernels/cpu/gguf_linear.h). Autotuned on CUDA with the
same Ampere/Hopper configurations; one small configuration under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..regimes import Regime, regime_for
from .int_linear import (_configs, cdiv, gemv_epilogue, interpreting, launch, launch_small, m_bucket, run_regime,
                         tune_bench)

# GGMLType value -> (weights, bytes) per block
GGUF_TRITON_TYPES = {2: (32, 18), 6: (32, 22), 8: (32, 34), 12: (256, 144), 14: (256, 210), 20: (32, 18), 23: (256, 136)}


@triton.jit
def _u8(ptr, off, mask):
    return tl.load(ptr + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptr, off, mask):
    h = _u8(ptr, off, mask) | (_u8(ptr, off + 1, mask) << 8)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _iq4_level(q):
    """IQ4_NL/IQ4_XS: the non-linear level of a 4-bit index (ggml's kvalues_iq4nl), as float32."""
    v = tl.where(q == 0, -127, tl.where(q == 1, -104, tl.where(q == 2, -83, tl.where(q == 3, -65,
        tl.where(q == 4, -49, tl.where(q == 5, -35, tl.where(q == 6, -22, tl.where(q == 7, -10,
        tl.where(q == 8, 1, tl.where(q == 9, 13, tl.where(q == 10, 25, tl.where(q == 11, 38,
        tl.where(q == 12, 53, tl.where(q == 13, 69, tl.where(q == 14, 89, 113)))))))))))))))
    return v.to(tl.float32)


@triton.jit
def _gguf_tile(b_ptr, offs_n, offs_k, N, K_lim, row_bytes, QTYPE: tl.constexpr):
    """(BLOCK_N, BLOCK_K) fp32 weights; 0 outside rows < N, columns < K_lim."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K_lim)
    row = offs_n[:, None].to(tl.int64) * row_bytes
    if QTYPE == 12 or QTYPE == 14 or QTYPE == 23:
        j = (offs_k % 256)[None, :]
        if QTYPE == 23:  # IQ4_XS: d | scales_h:u16 | scales_l[4] | qs[128], w = d * (ls - 32) * kv[q]
            base = row + (offs_k // 256)[None, :] * 136
            ib = j // 32
            l = j % 32
            ls = ((_u8(b_ptr, base + 4 + ib // 2, mask) >> (4 * (ib % 2))) & 15) | (
                ((_u8(b_ptr, base + 2 + ib // 4, mask) >> (2 * (ib % 4))) & 3) << 4)
            q = (_u8(b_ptr, base + 8 + 16 * ib + l % 16, mask) >> (4 * (l // 16))) & 15
            w = (_f16(b_ptr, base, mask) * (ls - 32).to(tl.float32)) * _iq4_level(q)
        elif QTYPE == 12:  # Q4_K: d | dmin | scales[12] | qs[128]
            base = row + (offs_k // 256)[None, :] * 144
            s = j // 32
            lo4 = s < 4
            a = _u8(b_ptr, base + 4 + s, mask)  # scales[s]
            b = _u8(b_ptr, base + 8 + s, mask)  # scales[s + 4]
            c = _u8(b_ptr, base + tl.where(lo4, 4, s), mask)  # scales[s - 4] for s >= 4
            sc = tl.where(lo4, a & 63, (b & 15) | ((c >> 6) << 4))
            mn = tl.where(lo4, b & 63, (b >> 4) | ((a >> 6) << 4))
            byte = _u8(b_ptr, base + 16 + 32 * (j // 64) + j % 32, mask)
            q = (byte >> (4 * (s % 2))) & 15
            d = _f16(b_ptr, base, mask)
            dmin = _f16(b_ptr, base + 2, mask)
            w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
        else:  # Q6_K: ql[128] | qh[64] | scales:i8[16] | d
            base = row + (offs_k // 256)[None, :] * 210
            h = j // 128
            kq = (j // 32) % 4
            l = j % 32
            lb = _u8(b_ptr, base + 64 * h + l + 32 * (kq % 2), mask)
            hb = _u8(b_ptr, base + 128 + 32 * h + l, mask)
            q = (((lb >> (4 * (kq // 2))) & 15) | (((hb >> (2 * kq)) & 3) << 4)) - 32
            sc = _u8(b_ptr, base + 192 + j // 16, mask)
            sc = sc - ((sc & 128) << 1)  # int8
            d = _f16(b_ptr, base + 208, mask)
            w = (d * sc.to(tl.float32)) * q.to(tl.float32)
    else:
        j = (offs_k % 32)[None, :]
        if QTYPE == 8:  # Q8_0: d | qs:i8[32]
            base = row + (offs_k // 32)[None, :] * 34
            q = _u8(b_ptr, base + 2 + j, mask)
            q = q - ((q & 128) << 1)
        elif QTYPE == 2:  # Q4_0: d | qs[16], w = d * (q - 8)
            base = row + (offs_k // 32)[None, :] * 18
            q = ((_u8(b_ptr, base + 2 + j % 16, mask) >> (4 * (j // 16))) & 15) - 8
        elif QTYPE == 20:  # IQ4_NL: d | qs[16], w = d * kv[q] (the level replaces the code below)
            base = row + (offs_k // 32)[None, :] * 18
            q = (_u8(b_ptr, base + 2 + j % 16, mask) >> (4 * (j // 16))) & 15
        else:  # Q5_0: d | qh:u32 | qs[16], w = d * (q - 16)
            base = row + (offs_k // 32)[None, :] * 22
            hi = (_u8(b_ptr, base + 2 + j // 8, mask) >> (j % 8)) & 1
            q = (((_u8(b_ptr, base + 6 + j % 16, mask) >> (4 * (j // 16))) & 15) | (hi << 4)) - 16
        if QTYPE == 20:
            w = _f16(b_ptr, base, mask) * _iq4_level(q)
        else:
            w = _f16(b_ptr, base, mask) * q.to(tl.float32)
    return tl.where(mask, w, 0.0)


@triton.jit
def _gemv_kernel(x_ptr, b_ptr, bias_ptr, out_ptr, M, N, K, row_bytes, stride_xm, stride_om, SPLIT_K,
                 QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per
    k_end = tl.minimum(k_start + k_per, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _gguf_tile(b_ptr, offs_n, offs_k, N, k_end, row_bytes, QTYPE)  # decoded once for BLOCK_M rows
        for i in tl.static_range(BLOCK_M):
            k_lim = tl.where(m0 + i < M, k_end, k_start)  # a row past M reads nothing
            xv = tl.load(x_ptr + (m0 + i) * stride_xm + offs_k, mask=offs_k < k_lim, other=0.0).to(tl.float32)
            acc = tl.where(rows[:, None] == i, acc + tl.sum(w * xv[None, :], axis=1)[None, :], acc)
    gemv_epilogue(acc, bias_ptr, out_ptr, m0 + rows, offs_n, M, N, stride_om, HAS_BIAS, DIRECT)


@triton.jit
def _dot_kernel(x_ptr, b_ptr, bias_ptr, out_ptr, M, N, K, row_bytes, stride_xm, stride_om, M_BUCKET,
                QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pipelined by Triton (num_stages) on CUDA
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                     mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _gguf_tile(b_ptr, offs_n, offs_k, N, K, row_bytes, QTYPE)
        if IEEE:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
        elif UPCAST:  # the interpreter's half tl.dot is wrong (see int_linear.py): same products in fp32
            acc += tl.dot(xt.to(tl.float32), tl.trans(w).to(xt.dtype).to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w).to(xt.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequant_kernel(b_ptr, out_ptr, N, K, row_bytes, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = _gguf_tile(b_ptr, offs_n, offs_k, N, K, row_bytes, QTYPE)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


# Smaller tiles than the int kernels': decoding a ggml weight takes several byte loads and more live
# values, and larger tiles spill (ptxas on sm_90, scripts/triton_aot_check.py: with the int kernels'
# tl.dot configurations a 16x128x128 tile spilled 1560 bytes for Q8_0 and 3410 for Q6_K; the lists
# below are checked there for Q8_0, Q4_K and Q6_K).
_GGUF_DOT_CONFIGS = _configs([(16, 64, 32, 4, 3), (16, 32, 64, 4, 3), (32, 64, 32, 4, 3), (64, 64, 32, 4, 3),
                              (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)], ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
_GGUF_GEMV_CONFIGS = _configs([(16, 256, 4, 3), (8, 512, 4, 3), (32, 128, 4, 3), (8, 256, 4, 3), (16, 256, 8, 3),
                               (4, 512, 4, 3)], ("BLOCK_N", "BLOCK_K"))  # (16, 512, 8 warps) spilled for Q4_K/Q6_K
_GGUF_DEQUANT_CONFIGS = _configs([(16, 64, 4, 1), (32, 64, 4, 1), (8, 256, 4, 1), (32, 128, 8, 1)],
                                 ("BLOCK_N", "BLOCK_K"))
_dot_tuned = triton.autotune(configs=_GGUF_DOT_CONFIGS, key=["M_BUCKET", "N", "K", "QTYPE", "IEEE"],
                             do_bench=tune_bench)(_dot_kernel)
_gemv_tuned = triton.autotune(configs=_GGUF_GEMV_CONFIGS, key=["N", "K", "SPLIT_K", "QTYPE", "BLOCK_M"],
                              reset_to_zero=["out_ptr"], do_bench=tune_bench)(_gemv_kernel)
_dequant_tuned = triton.autotune(configs=_GGUF_DEQUANT_CONFIGS, key=["N", "K", "QTYPE"],
                                 do_bench=tune_bench)(_dequant_kernel)


def triton_gguf_dequantize(blocks: torch.Tensor, qtype: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense (N, K) weight in ``dtype``, as the DEQUANT regime computes it."""
    n, k = blocks.shape[0], in_features
    blocks = blocks.contiguous()
    w = torch.empty(n, k, device=blocks.device, dtype=dtype)
    interp = interpreting()
    grid = lambda c: (cdiv(n, c["BLOCK_N"]), cdiv(k, c["BLOCK_K"]))  # noqa: E731
    (launch_small if interp else launch)(_dequant_kernel if interp else _dequant_tuned, grid, blocks, w, n, k,
                                         blocks.shape[1], QTYPE=int(qtype))
    return w


def triton_gguf_linear(x: torch.Tensor, blocks: torch.Tensor, bias: Optional[torch.Tensor], qtype: int,
                       in_features: int, path: str = "auto") -> torch.Tensor:
    """``x @ dequant(blocks)^T + bias``; ``path``: ``auto`` (the dispatcher's regime), ``gemv``, ``dot``
    or ``dequant``."""
    qtype = int(qtype)
    if qtype not in GGUF_TRITON_TYPES:
        raise ValueError(f"triton_gguf_linear: no Triton kernel for ggml type {qtype}")
    k, n = in_features, blocks.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    regime = regime_for(m, x.device) if path == "auto" else Regime(path)
    blocks = blocks.contiguous()
    interp = interpreting()
    go = launch_small if interp else launch

    def gemv(out, block_m, m_blocks, split):
        grid = lambda c: (cdiv(n, c["BLOCK_N"]), split, m_blocks)  # noqa: E731
        go(_gemv_kernel if interp else _gemv_tuned, grid, x2, blocks, bias if bias is not None else out, out, m, n, k,
           blocks.shape[1], x2.stride(0), out.stride(0), split, QTYPE=qtype, HAS_BIAS=bias is not None,
           DIRECT=split == 1, BLOCK_M=block_m)

    def dot(out):
        grid = lambda c: (cdiv(m, c["BLOCK_M"]), cdiv(n, c["BLOCK_N"]))  # noqa: E731
        go(_dot_kernel if interp else _dot_tuned, grid, x2, blocks, bias if bias is not None else out, out, m, n, k,
           blocks.shape[1], x2.stride(0), out.stride(0), m_bucket(m), QTYPE=qtype, HAS_BIAS=bias is not None,
           IEEE=x.dtype == torch.float32, UPCAST=interp)

    out = run_regime(regime, x2, n, k, bias, x.dtype, gemv, dot,
                     lambda: triton_gguf_dequantize(blocks, qtype, k, x.dtype))
    return out.reshape(*x.shape[:-1], n)
