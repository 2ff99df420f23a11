"""Triton dequant-matmul for ``torchcompress::int_linear``: group-wise unsigned codes of 2..8 bits,
symmetric (implicit zero 2^(bits-1)) or with uint8 zero points, per-group or per-tensor scales.

Three kernels, all dequantizing in registers straight from the packed codes:

* ``_gemv_words2d_kernel`` (decode, M <= ``GEMV_WORDS_MAX_M``, 2/4/8 bits on rows of whole int32 words,
  the common case): one program per (BLOCK_N outputs, K slice, row of x); a row's words are read
  with vector loads, each word's codes shifted out in an unrolled loop into a 2-D accumulator, the
  scale applied once per word. The K slices (split-K) add their fp32 partial sums atomically, so
  small layers still fill the GPU. Memory bound: reads each weight byte once per row of x.
* ``_gemv_kernel`` (M <= ``GEMV_MAX_M``): the same for any width (3/5/6/7 bits, rows of odd byte
  counts), reading codes byte by byte (about 4x slower on an H100 at 4 bits).
* ``_tiled_kernel`` (prefill): a BLOCK_M x BLOCK_N output tile, ``tl.dot`` of an x tile with the
  dequantized weight tile, fp32 accumulation (IEEE fp32 products when x is fp32, so results match
  the reference's fp32 matmul rather than TF32).

Code ``k`` of a row sits at bits ``[k*b, (k+1)*b)`` of the row's little-endian bit stream; widths
that do not divide 8 read two bytes; as little-endian int32 words, code ``k`` of word ``j`` sits at
bits ``[(k - j*32/b)*b, ...)``. On CUDA the launch configurations are autotuned (configs that suit
Ampere and Hopper; the batch is keyed by its power-of-two bucket, so a new prompt length does not
re-tune; ``TORCHCOMPRESS_TRITON_AUTOTUNE=0`` takes the first configuration, tuning nothing); under
``TRITON_INTERPRET=1`` (the CPU test suite) one small configuration runs so that every mask is exercised.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 8  # the byte-reading decode kernel up to this batch; the tiled kernel beyond
GEMV_WORDS_MAX_M = 16  # the word kernel up to this batch (on an H100 it beats the tiled kernel at 16)
SPLIT_WAVES = 2  # decode: K slices enough for this many programs per multiprocessor


@triton.jit
def _dequant_tile(qw_ptr, scale_ptr, zero_ptr, offs_n, offs_k, N, K_lim, row_bytes, s_rs, s_gs,
                  BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, CROSS: tl.constexpr):
    """(BLOCK_N, BLOCK_K) fp32 weights ``(code - zero) * scale``; 0 outside rows < N, columns < K_lim."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K_lim)
    bit = offs_k * BITS
    byte = bit // 8
    shift = bit % 8
    row = offs_n[:, None].to(tl.int64) * row_bytes
    v = tl.load(qw_ptr + row + byte[None, :], mask=mask, other=0).to(tl.int32)
    if CROSS:  # the code may continue into the next byte (bits not dividing 8)
        m1 = mask & ((byte[None, :] + 1) < row_bytes)
        v = v | (tl.load(qw_ptr + row + byte[None, :] + 1, mask=m1, other=0).to(tl.int32) << 8)
    code = (v >> shift[None, :]) & ((1 << BITS) - 1)
    sidx = offs_n[:, None].to(tl.int64) * s_rs + (offs_k // GS)[None, :] * s_gs
    s = tl.load(scale_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(zero_ptr + sidx, mask=mask, other=0).to(tl.float32)
    else:
        z = (1 << (BITS - 1)) * 1.0
    return tl.where(mask, (code.to(tl.float32) - z) * s, 0.0)


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, scale_ptr, zero_ptr, out_ptr, N, K, row_bytes, s_rs, s_gs, stride_xm, stride_om,
                 SPLIT_K, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, CROSS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per
    k_end = tl.minimum(k_start + k_per, K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _dequant_tile(qw_ptr, scale_ptr, zero_ptr, offs_n, offs_k, N, k_end, row_bytes, s_rs, s_gs,
                          BITS, GS, HAS_ZERO, CROSS)
        xv = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < k_end, other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    tl.atomic_add(out_ptr + m * stride_om + offs_n, acc, mask=offs_n < N)


@triton.jit
def _gemv_words2d_kernel(x_ptr, qw_ptr, scale_ptr, zero_ptr, out_ptr, N, K, row_words, s_rs, s_gs, stride_xm,
                         stride_om, SPLIT_K, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The decode kernel for widths that divide 32 (2, 4, 8 bits) on rows of whole int32 words.

    A (BLOCK_N, BLOCK_K / codes-per-word) tile of words is loaded contiguously per row (vector
    loads); code ``i`` of every word is shifted out in an unrolled loop and multiplied with the
    matching (strided) slice of x into a 2-D accumulator that is reduced once, after the K loop.
    When groups hold whole words (``GS % codes-per-word == 0``) scale and zero are applied once per
    word: sum_i (c_i - z) * s * x_i = s * (sum_i c_i * x_i - z * sum_i x_i)."""
    WPR: tl.constexpr = 32 // BITS  # codes per word
    BLOCK_W: tl.constexpr = BLOCK_K // WPR
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per
    k_end = tl.minimum(k_start + k_per, K)
    row = offs_n.to(tl.int64) * row_words
    srow = offs_n.to(tl.int64) * s_rs
    offs_j = tl.arange(0, BLOCK_W)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        w_idx = k0 // WPR + offs_j
        w_ok = w_idx * WPR < k_end  # K and k_end are whole words here
        wmask = n_mask[:, None] & w_ok[None, :]
        words = tl.load(qw_ptr + row[:, None] + w_idx[None, :], mask=wmask, other=0)
        x_row = x_ptr + m * stride_xm + w_idx * WPR
        if GS % WPR == 0:  # each word inside one group
            sidx = srow[:, None] + ((w_idx * WPR) // GS)[None, :] * s_gs
            s = tl.load(scale_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
            part = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
            xs = tl.zeros((BLOCK_W,), dtype=tl.float32)
            for i in tl.static_range(WPR):
                xi = tl.load(x_row + i, mask=w_ok, other=0.0).to(tl.float32)
                part += ((words >> (i * BITS)) & ((1 << BITS) - 1)).to(tl.float32) * xi[None, :]
                xs += xi
            if HAS_ZERO:
                z = tl.load(zero_ptr + sidx, mask=wmask, other=0).to(tl.float32)
                acc += s * (part - z * xs[None, :])
            else:
                acc += s * (part - (1 << (BITS - 1)) * xs[None, :])
        else:  # groups that split words: scale and zero per code
            for i in tl.static_range(WPR):
                xi = tl.load(x_row + i, mask=w_ok, other=0.0).to(tl.float32)
                sidx = srow[:, None] + ((w_idx * WPR + i) // GS)[None, :] * s_gs
                s = tl.load(scale_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(zero_ptr + sidx, mask=wmask, other=0).to(tl.float32)
                else:
                    z = (1 << (BITS - 1)) * 1.0
                acc += (((words >> (i * BITS)) & ((1 << BITS) - 1)).to(tl.float32) - z) * s * xi[None, :]
    tl.atomic_add(out_ptr + m * stride_om + offs_n, tl.sum(acc, axis=1), mask=n_mask)


@triton.jit
def _tiled_kernel(x_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K, row_bytes, s_rs, s_gs,
                  stride_xm, stride_om, M_BUCKET, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr,
                  CROSS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                     mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(qw_ptr, scale_ptr, zero_ptr, offs_n, offs_k, N, K, row_bytes, s_rs, s_gs,
                          BITS, GS, HAS_ZERO, CROSS)
        if IEEE:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
        elif UPCAST:  # same products (half x half is exact in fp32), for Triton's interpreter
            acc += tl.dot(xt.to(tl.float32), tl.trans(w).to(xt.dtype).to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w).to(xt.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# Autotuned variants for CUDA (Ampere: up to 128x128 tiles, 3-4 stages; Hopper: also 128x256).
_TILED_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (16, 64, 128, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3),
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
    ]
]
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(32, 128, 4, 3), (64, 128, 4, 3), (64, 256, 4, 3), (128, 128, 8, 3), (16, 512, 4, 2)]
]
_tiled_tuned = triton.autotune(configs=_TILED_CONFIGS, key=["M_BUCKET", "N", "K", "BITS", "GS", "IEEE"])(_tiled_kernel)
_gemv_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "SPLIT_K", "BITS", "GS"],
                              reset_to_zero=["out_ptr"])(_gemv_kernel)
_WORDS2D_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(8, 1024, 4, 3), (4, 2048, 4, 3), (8, 2048, 8, 3), (16, 1024, 8, 3), (4, 1024, 4, 3),
                         (16, 512, 4, 3), (32, 256, 4, 3), (64, 256, 4, 3)]
]
_gemv_words2d_tuned = triton.autotune(configs=_WORDS2D_CONFIGS, key=["N", "K", "SPLIT_K", "BITS", "GS"],
                                      reset_to_zero=["out_ptr"])(_gemv_words2d_kernel)


def launch(tuned, grid, *args, **meta) -> None:
    """Launch an autotuned kernel; with ``TORCHCOMPRESS_TRITON_AUTOTUNE=0``, its first configuration
    without benchmarking any (one compile per shape class: the GPU test suite, or a service that
    must not stall on a first call)."""
    if os.environ.get("TORCHCOMPRESS_TRITON_AUTOTUNE", "1") not in ("0", ""):
        tuned[grid](*args, **meta)
        return
    cfg = tuned.configs[0]
    tuned.fn[grid(cfg.kwargs)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def m_bucket(m: int) -> int:
    """The autotuning key for the batch: the next power of two, so that a new prompt length reuses
    the tuned configuration of its bucket instead of benchmarking every configuration again."""
    return 1 << max(0, m - 1).bit_length()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _split_k(n_blocks: int, m: int, k: int, device: torch.device) -> int:
    """Enough K slices that the grid covers the GPU about four times over (decode on small layers)."""
    if device.type != "cuda":
        return 2 if k > 64 else 1  # interpreter: exercise the atomic partial sums
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(SPLIT_WAVES * sms, max(n_blocks * m, 1)), triton.cdiv(k, 256), 16))


def triton_int_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    path: str = "auto",
) -> torch.Tensor:
    """``x @ dequant(qweight)^T + bias`` with the Triton kernels; ``path``: auto, gemv, tiled, or
    gemv-bytes (the byte-reading decode kernel even on rows of whole words)."""
    k = in_features
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    qweight, scale = qweight.contiguous(), scale.contiguous()
    zero = None if zero is None else zero.contiguous()
    s_rs = 0 if scale.shape[0] == 1 else scale.shape[1]
    s_gs = 0 if scale.shape[1] == 1 else 1
    meta = dict(BITS=bits, GS=min(group_size, k), HAS_ZERO=zero is not None, CROSS=8 % bits != 0)
    zp = zero if zero is not None else scale  # never read when HAS_ZERO is False
    interp = _interpreting()
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    # rows of whole int32 words (widths dividing 32): the decode kernel reads codes as words
    words = (path != "gemv-bytes" and 32 % bits == 0 and qweight.shape[1] % 4 == 0
             and qweight.storage_offset() % 4 == 0)
    if path in ("gemv", "gemv-bytes") or (path == "auto" and m <= (GEMV_WORDS_MAX_M if words else GEMV_MAX_M)):
        out = torch.zeros(m, n, device=x.device, dtype=torch.float32)
        gmeta = dict(meta)
        if words:
            kern, tuned, qw = _gemv_words2d_kernel, _gemv_words2d_tuned, qweight.view(torch.int32)
            del gmeta["CROSS"]
        else:
            kern, tuned, qw = _gemv_kernel, _gemv_tuned, qweight
        row = qw.shape[1]
        if interp:
            split = _split_k(triton.cdiv(n, 16), m, k, x.device)
            kern[(triton.cdiv(n, 16), split, m)](
                x2, qw, scale, zp, out, n, k, row, s_rs, s_gs, x2.stride(0), out.stride(0),
                split, BLOCK_N=16, BLOCK_K=32, **gmeta)
        else:
            split = _split_k(triton.cdiv(n, 64), m, k, x.device)
            grid = lambda cfg: (triton.cdiv(n, cfg["BLOCK_N"]), split, m)  # noqa: E731
            launch(tuned, grid, x2, qw, scale, zp, out, n, k, row, s_rs, s_gs, x2.stride(0), out.stride(0), split, **gmeta)
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], n)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bp = bias if bias is not None else scale
    args = (x2, qweight, scale, zp, bp, out, m, n, k, qweight.shape[1], s_rs, s_gs, x2.stride(0), out.stride(0),
            m_bucket(m))
    # UPCAST: Triton 3.9's interpreter computes tl.dot of bf16/fp16 operands wrongly (garbage results),
    # so there the rounded half operands are multiplied as fp32; on CUDA tensor cores take them as is.
    meta.update(HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, UPCAST=interp)
    if interp:
        _tiled_kernel[(triton.cdiv(m, 16), triton.cdiv(n, 16))](*args, BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, **meta)
    else:
        grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))  # noqa: E731
        launch(_tiled_tuned, grid, *args, **meta)
    return out.reshape(*x.shape[:-1], n)
