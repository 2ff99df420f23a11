"""Affine integer codes -> the inputs of onnxruntime's ``com.microsoft::MatMulNBits`` (pure tensor math).

MatMulNBits computes ``Y = A @ dequant(B)^T`` with ``dequant = (code - zero_point) * scale`` per
block of ``block_size`` input columns (a power of two >= 16). Its operands:

* ``B`` (N, k_blocks, block_size * bits / 8) uint8: each block's codes bit-packed along K, code ``i``
  at bits ``[i*bits, (i+1)*bits)`` of the block's little-endian stream (4 bits: low nibble first),
  the last block zero-padded;
* ``scales`` (N, k_blocks) in A's dtype;
* ``zero_points`` either packed uint8 (N, ceil(k_blocks * bits / 8)) with the same bit packing, or
  unpacked (N, k_blocks) in A's dtype; absent means ``2^(bits-1)``.

Our codes use the same affine form (primitives/affine.py): symmetric codes are offset by
``2^(bits-1)``, exactly MatMulNBits' default zero point, so symmetric layers carry no zero points.
A per-channel or per-tensor scale becomes one scale per block, repeated (exact). A group size that is
not a power of two >= 16 has no MatMulNBits block size: :func:`block_size_for` returns None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import pack

MATMUL_NBITS_BITS = (2, 4, 8)  # the op's `bits` attribute (onnxruntime 1.2x-1.3x schema)


@dataclass(frozen=True)
class NBitsWeight:
    b: torch.Tensor  # (N, k_blocks, blob) uint8
    scales: torch.Tensor  # (N, k_blocks) float32
    zero_points: torch.Tensor | None  # (N, ceil(k_blocks*bits/8)) uint8, or (N, k_blocks) float32, or None
    bits: int
    block_size: int
    k: int
    n: int


def _pow2_at_least_16(v: int) -> bool:
    return v >= 16 and v & (v - 1) == 0


def block_size_for(group_size: int, in_features: int) -> int | None:
    """MatMulNBits block size for a layer quantized in groups of ``group_size`` columns (``group_size
    >= in_features``: one group per row, i.e. per channel): the group itself when it is a power of
    two >= 16; for a per-channel layer any block (scales repeat), 128 or the smallest that holds K;
    None when the groups cannot be blocks."""
    if group_size >= in_features:  # one scale per row: every block repeats it
        for bs in (16, 32, 64):
            if in_features <= bs:
                return bs
        return 128
    return group_size if _pow2_at_least_16(group_size) else None


def to_matmul_nbits(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                    group_size: int, block_size: int) -> NBitsWeight:
    """(N, K) uint8 codes with ``scale``/``zero`` of shape (N, G), (N, 1) or (1, 1) in groups of
    ``group_size`` -> MatMulNBits operands with ``block_size`` (== group_size, or any block when the
    layer has one group per row). ``zero`` is uint8 (integer zero points) or float (HQQ-style), None
    for symmetric codes (offset 2^(bits-1))."""
    if bits not in MATMUL_NBITS_BITS:
        raise ValueError(f"MatMulNBits holds {MATMUL_NBITS_BITS} bits, not {bits}")
    n, k = codes.shape
    k_blocks = -(-k // block_size)
    per_row = group_size >= k
    if not per_row and group_size != block_size:
        raise ValueError(f"group size {group_size} != block size {block_size}")

    def per_block(t: torch.Tensor) -> torch.Tensor:  # (N|1, G|1) -> (N, k_blocks)
        t = t.expand(n, t.shape[1]) if t.shape[0] == 1 else t
        return t.expand(n, k_blocks).contiguous() if per_row else t.contiguous()

    padded = F.pad(codes, (0, k_blocks * block_size - k))  # (N, k_blocks * block_size); pad codes are never read
    b = pack(padded.view(n, k_blocks, block_size).contiguous(), bits)  # (N, k_blocks, block_size*bits/8)
    scales = per_block(scale.float())
    zp = None
    if zero is not None:
        zb = per_block(zero)
        zp = pack(zb.to(torch.uint8), bits) if zero.dtype == torch.uint8 else zb.float()
    return NBitsWeight(b, scales, zp, bits, block_size, k, n)


def dequantize_matmul_nbits(w: NBitsWeight) -> torch.Tensor:
    """(N, K) float32 weight that MatMulNBits computes with (the spec's formula; tests' oracle)."""
    from .packing import unpack

    n, kb, blob = w.b.shape
    codes = unpack(w.b.reshape(n * kb, blob), w.bits, w.block_size).reshape(n, kb, w.block_size).float()
    if w.zero_points is None:
        zp = torch.full((n, kb), float(1 << (w.bits - 1)))
    elif w.zero_points.dtype == torch.uint8:
        zp = unpack(w.zero_points, w.bits, kb).float()
    else:
        zp = w.zero_points
    deq = (codes - zp[..., None]) * w.scales[..., None]  # (N, kb, bs)
    return deq.reshape(n, kb * w.block_size)[:, : w.k]
