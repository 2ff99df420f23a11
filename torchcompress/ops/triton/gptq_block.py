"""Fused Triton kernel for GPTQ's inner loop over one block of columns, with quantization
parameters known per column (static groups, per-channel, per-tensor, or dynamic groups whose
parameters were computed at the block start).

For columns ``i = 0..B-1`` of the block ``W1`` (N, B), with ``U1`` (B, B) the block of the upper
Cholesky factor of ``H^-1`` (as in :func:`torchcompress.primitives.gptq.gptq_quantize`)::

    q      = clamp(round(W1[:, i] / s[:, i]) (+ z[:, i]), code range)
    err    = (W1[:, i] - (q - z[:, i]) * s[:, i]) / U1[i, i]
    W1[:, i:] -= err * U1[i, i:]

Rows are independent, so each program keeps a (BLOCK_N, B) tile of ``W1`` in registers for the
whole block: one launch instead of B small PyTorch ops per column. Returns the codes and the
scaled errors ``E1`` (the lazy update of later blocks, ``W[:, i2:] -= E1 @ U[i1:i2, i2:]``, stays
a matmul). :func:`gptq_block_reference` is the same loop in PyTorch, written with the RTN
functions the GPTQ implementation uses.

Called by ``primitives/gptq.py`` (``gptq_quantize(fused=...)``, on by default on CUDA).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...primitives.affine import dequantize_affine, quantize_with_qparams


@triton.jit
def _round_half_even(x):
    t = x + 0.5
    r = tl.floor(t)
    odd_tie = (r == t) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
    return tl.where(odd_tie, r - 1.0, r)


@triton.jit
def _gptq_block_kernel(w_ptr, u_ptr, s_ptr, z_ptr, q_ptr, e_ptr, N, B, stride_w, stride_u,
                       BITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_B)
    mask = (rows[:, None] < N) & (cols[None, :] < B)
    offs = rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    W = tl.load(w_ptr + offs, mask=mask, other=0.0)
    S = tl.load(s_ptr + offs, mask=mask, other=1.0)
    if HAS_ZERO:
        Z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    Q = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    E = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for i in range(0, B):
        sel = cols[None, :] == i
        wc = tl.sum(tl.where(sel, W, 0.0), axis=1)
        sc = tl.sum(tl.where(sel, S, 0.0), axis=1)
        q = _round_half_even(wc / sc)
        if HAS_ZERO:
            zc = tl.sum(tl.where(sel, Z, 0.0), axis=1)
            q = tl.minimum(tl.maximum(q + zc, 0.0), (1 << BITS) - 1.0)
        else:
            zc = (1 << (BITS - 1)) * 1.0
            q = tl.minimum(tl.maximum(q, -zc), zc - 1.0) + zc
        wq = (q - zc) * sc
        d = tl.load(u_ptr + i * stride_u + i)
        urow = tl.load(u_ptr + i * stride_u + cols, mask=(cols >= i) & (cols < B), other=0.0)
        err = (wc - wq) / d
        W = W - err[:, None] * urow[None, :]
        Q = tl.where(sel, q[:, None], Q)
        E = tl.where(sel, err[:, None], E)
    tl.store(q_ptr + offs, Q.to(tl.uint8), mask=mask)
    tl.store(e_ptr + offs, E, mask=mask)


def triton_gptq_block(w1: torch.Tensor, u1: torch.Tensor, s_cols: torch.Tensor, z_cols: Optional[torch.Tensor],
                      bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes (N, B) uint8, E1 (N, B) fp32)`` for block ``w1`` (N, B) fp32, ``u1`` (B, B), per-column
    scales ``s_cols`` (N, B) and zero points ``z_cols`` (N, B) or None (symmetric)."""
    n, b = w1.shape
    w1 = w1.float().contiguous()
    u1 = u1.float().contiguous()
    s = s_cols.float().contiguous()
    z = s if z_cols is None else z_cols.float().contiguous()
    codes = torch.empty(n, b, dtype=torch.uint8, device=w1.device)
    err = torch.empty(n, b, dtype=torch.float32, device=w1.device)
    block_b = triton.next_power_of_2(max(b, 16))
    block_n = 16 if block_b >= 128 else 32
    _gptq_block_kernel[(triton.cdiv(n, block_n),)](w1, u1, s, z, codes, err, n, b, w1.stride(0), u1.stride(0),
                                                   BITS=bits, HAS_ZERO=z_cols is not None, BLOCK_N=block_n,
                                                   BLOCK_B=block_b)
    return codes, err


def gptq_block_reference(w1: torch.Tensor, u1: torch.Tensor, s_cols: torch.Tensor, z_cols: Optional[torch.Tensor],
                         bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same block loop in PyTorch (the column step of ``gptq_quantize``)."""
    W1 = w1.float().clone()
    n, b = W1.shape
    codes = torch.empty(n, b, dtype=torch.uint8, device=w1.device)
    E1 = torch.zeros_like(W1)
    for i in range(b):
        s_c = s_cols[:, i:i + 1]
        z_c = None if z_cols is None else z_cols[:, i:i + 1].to(torch.uint8)
        wc = W1[:, i:i + 1]
        q = quantize_with_qparams(wc, s_c, z_c, bits, 1)
        codes[:, i] = q[:, 0]
        wq = dequantize_affine(q, s_c, z_c, bits, 1)
        e = (wc - wq) / u1[i, i]
        W1[:, i:] -= e @ u1[i:i + 1, i:]
        E1[:, i:i + 1] = e
    return codes, E1
