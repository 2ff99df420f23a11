"""The pre-shuffled ("K-major words") layout of packed integer codes, for the ``tl.dot`` kernel.

The checkpoint layout (:mod:`.packing`) is row-major: row ``n`` holds its K codes as a little-endian
bit stream, ``ceil(K*b/8)`` bytes. For widths dividing 32 (2, 4, 8 bits) with whole int32 words per
row, the same bytes viewed as int32 are an (N, K/W) matrix of words (W = 32/b codes per word). The
K-major layout is its transpose, (K/W, N) int32, contiguous: a tile of BLOCK_K x BLOCK_N weights is
BLOCK_K/W rows of BLOCK_N consecutive words (coalesced loads), unpacked straight into the
(BLOCK_K, BLOCK_N) operand of ``tl.dot``. It is built once, at pack or load time, as a working copy
beside the checkpoint buffer (which stays as it is: saved files do not change).

Example::

    qkn = to_kmajor(qweight, 4, 4096)              # (512, N) int32
    assert torch.equal(from_kmajor(qkn, 4, 4096), qweight)
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .packing import packed_len


def kmajor_supported(bits: int, in_features: int, group_size: int) -> bool:
    """Whole int32 words per row, and groups made of whole words (scale and zero once per word)."""
    if 32 % bits:
        return False
    w = 32 // bits
    return in_features % w == 0 and group_size % w == 0


def to_kmajor(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """(N, K*b/8) uint8, rows of whole int32 words -> (K/W, N) int32 contiguous."""
    n, row = qweight.shape
    if qweight.dtype != torch.uint8 or row != packed_len(in_features, bits) or 32 % bits or row % 4:
        raise ConfigError("qweight", f"{tuple(qweight.shape)} {qweight.dtype} is not {bits}-bit codes in rows of "
                                     f"whole int32 words for in_features={in_features}")
    return qweight.contiguous().view(torch.int32).t().contiguous()


def from_kmajor(qkn: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The inverse of :func:`to_kmajor`: (K/W, N) int32 -> (N, K*b/8) uint8."""
    if qkn.dtype != torch.int32 or qkn.shape[0] * 32 != in_features * bits:
        raise ConfigError("qweight_kn", f"{tuple(qkn.shape)} {qkn.dtype} is not the K-major layout of "
                                        f"{bits}-bit codes for in_features={in_features}")
    return qkn.t().contiguous().view(torch.uint8)
