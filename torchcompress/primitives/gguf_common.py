"""Shared pieces of ggml's block formats: the type table and the scalar rules ggml's C code uses.

Bit-exactness with ggml's reference quantizers (``quantize_row_*_ref`` in ``ggml-quants.c``) rests on
doing every float operation in float32, one IEEE operation at a time, in the order the C code does
it. In particular:

* ``nearest_int`` is ggml's magic-number trick (add 1.5*2^23, read the mantissa bits), emulated
  exactly here, not ``torch.round``: the two agree for |x| < 2^22 but not beyond.
* ``roundf`` (Q8_0/Q8_1) rounds halves away from zero; ``torch.round`` rounds them to even.
* float -> fp16 is round-to-nearest-even with overflow to inf (what ``GGML_FP32_TO_FP16`` does).
* sums are accumulated left to right (see :func:`seqsum`): a tree reduction rounds differently.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

QK_K = 256


class GGMLType(enum.IntEnum):
    """ggml tensor types we read or write (values are ggml's ``enum ggml_type``)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ4_NL = 20
    IQ4_XS = 23
    BF16 = 30


@dataclass(frozen=True)
class BlockLayout:
    block_size: int  # weights per block
    type_size: int  # bytes per block


LAYOUTS: dict[GGMLType, BlockLayout] = {
    GGMLType.F32: BlockLayout(1, 4),
    GGMLType.F16: BlockLayout(1, 2),
    GGMLType.BF16: BlockLayout(1, 2),
    GGMLType.Q4_0: BlockLayout(32, 18),
    GGMLType.Q4_1: BlockLayout(32, 20),
    GGMLType.Q5_0: BlockLayout(32, 22),
    GGMLType.Q5_1: BlockLayout(32, 24),
    GGMLType.Q8_0: BlockLayout(32, 34),
    GGMLType.Q8_1: BlockLayout(32, 36),
    GGMLType.Q2_K: BlockLayout(256, 84),
    GGMLType.Q3_K: BlockLayout(256, 110),
    GGMLType.Q4_K: BlockLayout(256, 144),
    GGMLType.Q5_K: BlockLayout(256, 176),
    GGMLType.Q6_K: BlockLayout(256, 210),
    GGMLType.IQ4_NL: BlockLayout(32, 18),
    GGMLType.IQ4_XS: BlockLayout(256, 136),
}


def row_bytes(qtype: GGMLType, n: int) -> int:
    """Bytes of one row of ``n`` weights (``n`` must be a multiple of the block size)."""
    lay = LAYOUTS[GGMLType(qtype)]
    return n // lay.block_size * lay.type_size


_MAGIC = 12582912.0  # 1.5 * 2^23


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` on float32, bit for bit (int32 result)."""
    bits = (x + _MAGIC).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def cdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` as one correctly rounded float32 division.

    Not ``c / t`` on a tensor: PyTorch evaluates a scalar numerator as ``reciprocal(t) * c``, which
    rounds twice and differs from C's ``c / t`` in the last bit for about a quarter of inputs.
    """
    return torch.full_like(t, c).div_(t)


def round_away(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: halves away from zero (``x - trunc(x)`` is exact, so no double rounding)."""
    t = torch.trunc(x)
    return t + torch.sign(x) * ((x - t).abs() >= 0.5).to(x.dtype)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(...,) float32 -> (..., 2) uint8, little-endian fp16 (RNE, overflow -> inf)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 -> (...,) float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> fp16 -> float32 (``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))``)."""
    return x.to(torch.float16).to(torch.float32)


def seqsum(terms) -> torch.Tensor:
    """Left-to-right float32 sum of an iterable of tensors, as a C ``for`` loop accumulates."""
    it = iter(terms)
    acc = next(it).clone()
    for t in it:
        acc = acc + t
    return acc


def blocks_view(x: torch.Tensor, block: int, what: str = "tensor") -> torch.Tensor:
    """(..., K) -> (n_blocks, block) float32; K must be a multiple of ``block``."""
    from ..errors import ConfigError

    if x.shape[-1] % block:
        raise ConfigError(what, f"last dimension {x.shape[-1]} is not a multiple of the block size {block}")
    return x.detach().to(torch.float32).reshape(-1, block)
