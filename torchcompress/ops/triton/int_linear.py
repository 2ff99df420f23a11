"""Triton W(2..8)A16 kernels for ``torchcompress::int_linear``: group-wise unsigned codes, symmetric
(implicit zero 2^(bits-1)) or with zero points (uint8, or float as HQQ), per-group or per-tensor scales.

One kernel per batch regime, picked by :func:`torchcompress.ops.regimes.regime_for` from the
per-device crossovers:

* ``_gemv_kernel`` (GEMV, decode): split-K; one program per (BLOCK_N outputs, K slice, up to
  BLOCK_M rows of x), so each packed word is read once for all rows (M <= 8: once per call); the
  weight tile is unpacked in registers (int32 words with vector loads where rows are whole words,
  bytes otherwise), fp32 accumulation; the K slices added atomically into a zeroed fp32 output, or,
  with one slice (the grid already fills the GPU), bias and cast fused: a single launch.
* ``_dot_kernel`` (DOT, batch 16..128): BLOCK_M x BLOCK_N output tiles, ``tl.dot`` of the x tile and
  the weight tile unpacked in registers, fp32 accumulation, a K loop that Triton software-pipelines
  (``num_stages`` of the configurations). Reads the checkpoint's row-major codes, or the K-major
  pre-shuffled copy (:mod:`torchcompress.primitives.kernel_layout`) when the caller has one.
* ``_dequant_kernel`` (DEQUANT, prefill): the weight dequantized once to x's dtype (a temporary of
  this call, never kept), then ``F.linear`` (the tensor-core GEMM of torch).

fp32 activations use IEEE fp32 products (results match the reference's fp32 matmul, not TF32). On
CUDA the launch configurations are autotuned (Ampere/Hopper tiles; the batch keyed by its power-of-two
bucket; ``TORCHCOMPRESS_TRITON_AUTOTUNE=0`` takes the first configuration, tuning nothing); under
``TRITON_INTERPRET=1`` (the CPU test suite) one small configuration runs so that every mask is exercised.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..regimes import Regime, regime_for
from .int_tiles import bytes_tile_nk, words_tile_kn, words_tile_nk

SPLIT_WAVES = 2  # GEMV: K slices enough for this many programs per multiprocessor
GEMV_BLOCK_M = 8  # GEMV: rows of x per program (each weight tile is read once per 8 rows)

# weight layouts (constexpr LAYOUT)
BYTES, WORDS_NK, WORDS_KN = 0, 1, 2


@triton.jit
def _w_tile_nk(qw_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K_lim, row_len, s_rs, s_gs, BITS: tl.constexpr,
               GS: tl.constexpr, HAS_ZERO: tl.constexpr, CROSS: tl.constexpr, LAYOUT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr):
    if LAYOUT == 1:
        return words_tile_nk(qw_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K_lim, row_len, s_rs, s_gs,
                             BITS, GS, HAS_ZERO, BLOCK_N, BLOCK_K, VEC)
    return bytes_tile_nk(qw_ptr, scale_ptr, zero_ptr, offs_n, k0 + tl.arange(0, BLOCK_K), N, K_lim, row_len,
                         s_rs, s_gs, BITS, GS, HAS_ZERO, CROSS)


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K, row_len, s_rs, s_gs, stride_xm,
                 stride_om, SPLIT_K, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, CROSS: tl.constexpr,
                 VEC: tl.constexpr, LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr,
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
        w = _w_tile_nk(qw_ptr, scale_ptr, zero_ptr, offs_n, k0, N, k_end, row_len, s_rs, s_gs,
                       BITS, GS, HAS_ZERO, CROSS, LAYOUT, BLOCK_N, BLOCK_K, VEC)  # (BLOCK_N, BLOCK_K), read once
        offs_k = k0 + tl.arange(0, BLOCK_K)
        for i in tl.static_range(BLOCK_M):  # every row of x against the same tile
            k_lim = tl.where(m0 + i < M, k_end, k_start)  # a row past M reads nothing
            xv = tl.load(x_ptr + (m0 + i) * stride_xm + offs_k, mask=offs_k < k_lim, other=0.0).to(tl.float32)
            part = tl.sum(w * xv[None, :], axis=1)  # (BLOCK_N,)
            acc = tl.where(rows[:, None] == i, acc + part[None, :], acc)
    gemv_epilogue(acc, bias_ptr, out_ptr, m0 + rows, offs_n, M, N, stride_om, HAS_BIAS, DIRECT)


@triton.jit
def gemv_epilogue(acc, bias_ptr, out_ptr, rows, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr):
    """DIRECT (one K slice): the program owns its outputs, adds the bias and stores in the output's dtype
    (one launch in all); else fp32 partial sums added atomically into a zeroed fp32 output."""
    omask = (rows < M)[:, None] & (offs_n < N)[None, :]
    ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(ptrs, acc, mask=omask)


@triton.jit
def _dot_kernel(x_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K, row_len, s_rs, s_gs,
                stride_xm, stride_om, M_BUCKET, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr,
                CROSS: tl.constexpr, VEC: tl.constexpr, LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pipelined by Triton (num_stages) on CUDA
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                     mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        if LAYOUT == 2:
            wt = words_tile_kn(qw_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, s_rs, s_gs, BITS, GS, HAS_ZERO,
                               BLOCK_N, BLOCK_K)  # (BLOCK_K, BLOCK_N)
        else:
            wt = tl.trans(_w_tile_nk(qw_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, row_len, s_rs, s_gs,
                                     BITS, GS, HAS_ZERO, CROSS, LAYOUT, BLOCK_N, BLOCK_K, VEC))
        if IEEE:
            acc += tl.dot(xt.to(tl.float32), wt, input_precision="ieee")
        elif UPCAST:  # same products (half x half is exact in fp32), for Triton's interpreter
            acc += tl.dot(xt.to(tl.float32), wt.to(xt.dtype).to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, wt.to(xt.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequant_kernel(qw_ptr, scale_ptr, zero_ptr, out_ptr, N, K, row_len, s_rs, s_gs, BITS: tl.constexpr,
                    GS: tl.constexpr, HAS_ZERO: tl.constexpr, CROSS: tl.constexpr, VEC: tl.constexpr, LAYOUT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = _w_tile_nk(qw_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K, row_len, s_rs, s_gs,
                   BITS, GS, HAS_ZERO, CROSS, LAYOUT, BLOCK_N, BLOCK_K, VEC)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def _configs(rows, names):
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


# CUDA configurations (Ampere: up to 128x128 tiles, 3-4 stages; Hopper: also 128x256). The first of
# each list is what TORCHCOMPRESS_TRITON_AUTOTUNE=0 runs.
_DOT_CONFIGS = _configs([(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
                         (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)],
                        ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
_GEMV_CONFIGS = _configs([(16, 256, 4, 3), (8, 512, 4, 3), (32, 256, 4, 3), (16, 512, 8, 3), (64, 128, 4, 3),
                          (8, 1024, 8, 2), (4, 1024, 4, 2)], ("BLOCK_N", "BLOCK_K"))
_DEQUANT_CONFIGS = _configs([(32, 256, 4, 1), (64, 128, 4, 1), (16, 512, 4, 1), (64, 256, 8, 1)],
                            ("BLOCK_N", "BLOCK_K"))


def tune_bench(kernel_call, quantiles):
    """The autotuner's timing of one configuration: 5 ms warm-up, 25 ms of runs (Triton's default is
    25 + 100 ms; tuning every shape of bench_triton must fit in scripts/gpu_check.sh's few minutes)."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_MIN_BLOCK_K = min(c.kwargs["BLOCK_K"] for c in _DOT_CONFIGS + _GEMV_CONFIGS + _DEQUANT_CONFIGS)
_dot_tuned = triton.autotune(configs=_DOT_CONFIGS, key=["M_BUCKET", "N", "K", "BITS", "GS", "IEEE", "LAYOUT"],
                             do_bench=tune_bench)(_dot_kernel)
_gemv_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "SPLIT_K", "BITS", "GS", "LAYOUT", "BLOCK_M"],
                              reset_to_zero=["out_ptr"], do_bench=tune_bench)(_gemv_kernel)
_dequant_tuned = triton.autotune(configs=_DEQUANT_CONFIGS, key=["N", "K", "BITS", "GS", "LAYOUT"],
                                 do_bench=tune_bench)(_dequant_kernel)


def launch(tuned, grid, *args, **meta) -> None:
    """Launch an autotuned kernel; with ``TORCHCOMPRESS_TRITON_AUTOTUNE=0``, its first configuration
    without benchmarking any (one compile per shape class: the GPU test suite, or a service that
    must not stall on a first call)."""
    if os.environ.get("TORCHCOMPRESS_TRITON_AUTOTUNE", "1") not in ("0", ""):
        tuned[grid](*args, **meta)
        return
    cfg = tuned.configs[0]
    tuned.fn[grid(cfg.kwargs)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def launch_small(kernel, grid, *args, **meta) -> None:
    """The interpreter's launch: one small configuration (16-row tiles, 32 columns) for every kernel."""
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}
    cfg = {k: v for k, v in small.items() if k in kernel.arg_names and k not in meta}
    kernel[grid(cfg)](*args, **meta, **cfg)


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (``triton.cdiv`` is a JIT function: microseconds per Python call)."""
    return -(-a // b)


def m_bucket(m: int) -> int:
    """The autotuning key for the batch: the next power of two, so that a new prompt length reuses
    the tuned configuration of its bucket instead of benchmarking every configuration again."""
    return 1 << max(0, m - 1).bit_length()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_k(n_blocks: int, m_blocks: int, k: int, device: torch.device) -> int:
    """Enough K slices that the grid covers the GPU about SPLIT_WAVES times over (decode on small layers)."""
    if device.type != "cuda":
        return 2 if k > 64 else 1  # interpreter: exercise the atomic partial sums
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(cdiv(SPLIT_WAVES * sms, max(n_blocks * m_blocks, 1)), cdiv(k, 256), 16))


def run_regime(regime: Regime, x2: torch.Tensor, n: int, k: int, bias: Optional[torch.Tensor], out_dtype,
               gemv, dot, dequant_weight) -> torch.Tensor:
    """The shared driver of the int and GGUF kernels: ``gemv(out, block_m, m_blocks, split)`` and
    ``dot(out)`` launch their kernels; ``dequant_weight()`` returns the dense (N, K) weight in ``out_dtype``."""
    m = x2.shape[0]
    if regime is Regime.GEMV:
        block_m = min(GEMV_BLOCK_M, 1 << (m - 1).bit_length())
        m_blocks = cdiv(m, block_m)
        split = split_k(cdiv(n, 16 if interpreting() else 64), m_blocks, k, x2.device)
        if split == 1:  # the kernel adds the bias and writes x's dtype itself
            out = torch.empty(m, n, device=x2.device, dtype=out_dtype)
            gemv(out, block_m, m_blocks, split)
            return out
        out = torch.zeros(m, n, device=x2.device, dtype=torch.float32)
        gemv(out, block_m, m_blocks, split)
        if bias is not None:
            out += bias.float()
        return out.to(out_dtype)
    if regime is Regime.DOT:
        out = torch.empty(m, n, device=x2.device, dtype=out_dtype)
        dot(out)
        return out
    w = dequant_weight()  # (N, K) in x's dtype: this call's temporary
    return F.linear(x2, w, None if bias is None else bias.to(out_dtype))


class _Weight:
    """The packed weight as the kernels read it: int32 words where rows and groups are whole words
    (2/4/8 bits), else bytes; scale and zero strides (0 along a per-tensor axis)."""

    def __init__(self, qweight, scale, zero, bits: int, group_size: int, k: int):
        qweight, self.scale = qweight.contiguous(), scale.contiguous()
        self.zero = None if zero is None else zero.contiguous()
        self.s_rs = 0 if scale.shape[0] == 1 else scale.shape[1]
        self.s_gs = 0 if scale.shape[1] == 1 else 1
        gs = min(group_size, k)
        self.words = (32 % bits == 0 and qweight.shape[1] % 4 == 0 and qweight.storage_offset() % 4 == 0
                      and gs % (32 // bits) == 0)
        self.qw, self.layout = (qweight.view(torch.int32), WORDS_NK) if self.words else (qweight, BYTES)
        self.row_len = self.qw.shape[1]
        # VEC: rows of a multiple of 4 words (16 bytes) and every tile's BLOCK_K a multiple of 4 words,
        # for 128-bit loads of the word tiles (the smallest BLOCK_K: 32 in the interpreter, of the configurations on CUDA)
        vec = self.words and self.row_len % 4 == 0 and (32 if interpreting() else _MIN_BLOCK_K) % (4 * (32 // bits)) == 0
        self.meta = dict(BITS=bits, GS=gs, HAS_ZERO=zero is not None, CROSS=8 % bits != 0, VEC=vec)
        self.zp = self.zero if self.zero is not None else self.scale  # never read when HAS_ZERO is False

    def dequantize(self, n: int, k: int, dtype, device) -> torch.Tensor:
        w = torch.empty(n, k, device=device, dtype=dtype)
        interp = interpreting()
        grid = lambda c: (cdiv(n, c["BLOCK_N"]), cdiv(k, c["BLOCK_K"]))  # noqa: E731
        (launch_small if interp else launch)(_dequant_kernel if interp else _dequant_tuned, grid, self.qw, self.scale,
                                             self.zp, w, n, k, self.row_len, self.s_rs, self.s_gs,
                                             LAYOUT=self.layout, **self.meta)
        return w


def triton_dequantize(qweight, scale, zero, bits: int, group_size: int, in_features: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The dense (N, K) weight in ``dtype``, as the DEQUANT regime computes it."""
    pw = _Weight(qweight, scale, zero, bits, group_size, in_features)
    return pw.dequantize(qweight.shape[0], in_features, dtype, qweight.device)


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
    qweight_kn: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x @ dequant(qweight)^T + bias``; ``path``: ``auto`` (the dispatcher's regime for this batch and
    device), ``gemv``, ``dot`` or ``dequant``. ``qweight_kn``: the K-major copy of ``qweight``
    (:func:`~torchcompress.primitives.kernel_layout.to_kmajor`) for the ``tl.dot`` regime, or None."""
    k = in_features
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    regime = regime_for(m, x.device) if path == "auto" else Regime(path)
    pw = _Weight(qweight, scale, zero, bits, group_size, k)
    interp = interpreting()
    go = launch_small if interp else launch

    def gemv(out, block_m, m_blocks, split):
        grid = lambda c: (cdiv(n, c["BLOCK_N"]), split, m_blocks)  # noqa: E731
        go(_gemv_kernel if interp else _gemv_tuned, grid, x2, pw.qw, pw.scale, pw.zp,
           bias if bias is not None else out, out, m, n, k, pw.row_len, pw.s_rs, pw.s_gs, x2.stride(0), out.stride(0),
           split, LAYOUT=pw.layout, HAS_BIAS=bias is not None, DIRECT=split == 1, BLOCK_M=block_m, **pw.meta)

    def dot(out):
        kn = qweight_kn is not None and pw.words
        grid = lambda c: (cdiv(m, c["BLOCK_M"]), cdiv(n, c["BLOCK_N"]))  # noqa: E731
        # UPCAST: Triton's interpreter computes tl.dot of bf16/fp16 operands wrongly (garbage results),
        # so there the rounded half operands are multiplied as fp32; on CUDA tensor cores take them as is.
        go(_dot_kernel if interp else _dot_tuned, grid, x2, qweight_kn if kn else pw.qw, pw.scale, pw.zp,
           bias if bias is not None else pw.scale, out, m, n, k, pw.row_len, pw.s_rs, pw.s_gs, x2.stride(0),
           out.stride(0), m_bucket(m), LAYOUT=WORDS_KN if kn else pw.layout, HAS_BIAS=bias is not None,
           IEEE=x.dtype == torch.float32, UPCAST=interp, **pw.meta)

    out = run_regime(regime, x2, n, k, bias, x.dtype, gemv, dot, lambda: pw.dequantize(n, k, x.dtype, x.device))
    return out.reshape(*x.shape[:-1], n)
