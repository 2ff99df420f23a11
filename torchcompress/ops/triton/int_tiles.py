"""Weight tiles of group-wise integer codes, dequantized in registers: the building blocks of the
kernels in :mod:`.int_linear`. Each returns fp32 ``(code - zero) * scale``, 0 outside the matrix.

Code ``k`` of a row sits at bits ``[k*b, (k+1)*b)`` of the row's little-endian bit stream, so in
little-endian int32 word ``j`` (widths dividing 32: 2, 4, 8 bits) code ``j*W + i`` (``W = 32/b``)
sits at bits ``[i*b, (i+1)*b)``.

* :func:`bytes_tile_nk`: any width 2..8, codes read byte by byte (two bytes where a code crosses one);
* :func:`words_tile_nk`: whole int32 words of the checkpoint layout (N, K/W), every code of a word
  shifted out in registers, scale and zero loaded once per word (needs groups of whole words,
  ``GS % W == 0``); with ``VEC`` (rows of a multiple of 4 words) the K mask is declared constant over
  4 words so the compiler emits 128-bit loads (``ld.global.v4.b32``; checked in the PTX for sm_90);
* :func:`words_tile_kn`: the same words pre-shuffled K-major, (K/W, N) (see
  :mod:`torchcompress.primitives.kernel_layout`): a ``tl.dot`` tile's words are contiguous along N
  (coalesced loads) and come out as the (BLOCK_K, BLOCK_N) operand with no transpose.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bytes_tile_nk(qw_ptr, scale_ptr, zero_ptr, offs_n, offs_k, N, K_lim, row_bytes, s_rs, s_gs,
                  BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, CROSS: tl.constexpr):
    """(BLOCK_N, BLOCK_K) weights of rows ``offs_n``, columns ``offs_k`` (< K_lim)."""
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
def words_tile_nk(qw_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K_lim, row_words, s_rs, s_gs,
                  BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr):
    """(BLOCK_N, BLOCK_K) weights of columns ``k0 .. k0+BLOCK_K`` from (N, K/W) int32 words;
    ``k0`` and ``K_lim`` are multiples of W."""
    W: tl.constexpr = 32 // BITS
    BLOCK_W: tl.constexpr = BLOCK_K // W
    tl.static_assert((not VEC) or (BLOCK_K % (4 * W) == 0), "VEC needs tiles of a multiple of 4 words")
    offs_w = tl.multiple_of(k0 // W, BLOCK_W) + tl.arange(0, BLOCK_W)
    kmask = (offs_w * W) < K_lim
    if VEC:  # rows of 4j words and K_lim a multiple of 4 words (k0 and the K slices are multiples of
        kmask = tl.max_constancy(kmask, [4])  # BLOCK_K >= 4 W): the mask is constant over 4 words, so 128-bit loads
    mask = (offs_n[:, None] < N) & kmask[None, :]
    words = tl.load(qw_ptr + offs_n[:, None].to(tl.int64) * row_words + offs_w[None, :], mask=mask, other=0)
    sidx = offs_n[:, None].to(tl.int64) * s_rs + ((offs_w * W) // GS)[None, :] * s_gs
    s = tl.load(scale_ptr + sidx, mask=mask, other=0.0).to(tl.float32)  # 0 outside: the weight is 0
    if HAS_ZERO:
        z = tl.load(zero_ptr + sidx, mask=mask, other=0).to(tl.float32)
    else:
        z = tl.full((BLOCK_N, BLOCK_W), (1 << (BITS - 1)) * 1.0, tl.float32)
    shifts = tl.arange(0, W) * BITS
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # (BLOCK_N, BLOCK_W, W)
    w = (codes.to(tl.float32) - z[:, :, None]) * s[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def words_tile_kn(qkn_ptr, scale_ptr, zero_ptr, offs_n, k0, N, K_lim, s_rs, s_gs,
                  BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_K, BLOCK_N) weights (the transposed tile) from K-major (K/W, N) int32 words."""
    W: tl.constexpr = 32 // BITS
    BLOCK_W: tl.constexpr = BLOCK_K // W
    offs_w = k0 // W + tl.arange(0, BLOCK_W)
    mask = ((offs_w * W) < K_lim)[:, None] & (offs_n[None, :] < N)
    words = tl.load(qkn_ptr + offs_w[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask, other=0)
    sidx = offs_n[None, :].to(tl.int64) * s_rs + ((offs_w * W) // GS)[:, None] * s_gs
    s = tl.load(scale_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(zero_ptr + sidx, mask=mask, other=0).to(tl.float32)
    else:
        z = tl.full((BLOCK_W, BLOCK_N), (1 << (BITS - 1)) * 1.0, tl.float32)
    shifts = tl.arange(0, W) * BITS
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # (BLOCK_W, W, BLOCK_N)
    w = (codes.to(tl.float32) - z[:, None, :]) * s[:, None, :]
    return tl.reshape(w, (BLOCK_K, BLOCK_N))
