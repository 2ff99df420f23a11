"""ggml's 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1: quantize to bytes, dequantize.

Each quantizer follows ``quantize_row_<type>_ref`` in ggml-quants.c operation by operation, on all
blocks at once. Float -> small-integer conversions are done as C does them on x86: truncate to
int32, keep the low byte (see :func:`_c_int8` / :func:`_c_uint8`), so even degenerate blocks give
ggml's bytes. Block layouts (little-endian):

    Q4_0  d:f16 | qs[16]                   w = d * (q - 8)
    Q4_1  d:f16 | m:f16 | qs[16]           w = d * q + m
    Q5_0  d:f16 | qh:u32 | qs[16]          w = d * (q - 16), q's 5th bit in qh
    Q5_1  d:f16 | m:f16 | qh:u32 | qs[16]  w = d * q + m
    Q8_0  d:f16 | qs:i8[32]                w = d * q
    Q8_1  d:f16 | s:f16 | qs:i8[32]        w = d * q, s = d * sum(q)

A nibble byte ``j`` holds weight ``j`` (low) and weight ``j + 16`` (high).
"""

from __future__ import annotations

import torch

from .gguf_common import blocks_view, cdiv, fp16_bytes, fp16_from_bytes, round_away


def _c_int8(v: torch.Tensor) -> torch.Tensor:
    """float -> (int8_t) as x86 C code converts: truncate to int32, keep the low byte (signed)."""
    i = v.to(torch.int32) & 0xFF
    return (i ^ 0x80) - 0x80


def _c_uint8(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.int32) & 0xFF


def _absmax_signed(b: torch.Tensor) -> torch.Tensor:
    """The first element of largest magnitude, with its sign ((nb, 32) -> (nb, 1))."""
    idx = b.abs().argmax(dim=-1, keepdim=True)  # first occurrence, like the C loop's strict '<'
    return b.gather(-1, idx)


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, cdiv(1.0, d), torch.zeros_like(d))


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(nb, 32) int codes -> (nb, 16) bytes: low nibble weight j, high nibble weight j+16.

    ``qs[j] = xi0; qs[j] |= xi1 << 4`` on uint8, reproduced with the same masking.
    """
    return ((q[:, :16] | (q[:, 16:] << 4)) & 0xFF).to(torch.uint8)


def _qh_bits(q: torch.Tensor) -> torch.Tensor:
    """(nb, 32) 5-bit codes -> (nb, 4) bytes of the little-endian u32 of their 5th bits."""
    bits = ((q >> 4) & 1).to(torch.int32).reshape(-1, 4, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)
    return (bits * weights).sum(-1).to(torch.uint8)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    b = blocks_view(x, 32)
    d = _absmax_signed(b) / -8.0
    q = torch.clamp(_c_int8(b * _inv(d) + 8.5), max=15)
    return torch.cat([fp16_bytes(d[:, 0]), _nibbles(q)], dim=1)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    b = blocks_view(x, 32)
    mn = b.amin(-1, keepdim=True)
    mx = b.amax(-1, keepdim=True)
    d = (mx - mn) / 15.0
    q = torch.clamp(_c_int8((b - mn) * _inv(d) + 0.5), max=15)
    return torch.cat([fp16_bytes(d[:, 0]), fp16_bytes(mn[:, 0]), _nibbles(q)], dim=1)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    b = blocks_view(x, 32)
    d = _absmax_signed(b) / -16.0
    q = torch.clamp(_c_int8(b * _inv(d) + 16.5), max=31) & 0xFF
    return torch.cat([fp16_bytes(d[:, 0]), _qh_bits(q), _nibbles(q & 0x0F)], dim=1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    b = blocks_view(x, 32)
    mn = b.amin(-1, keepdim=True)
    mx = b.amax(-1, keepdim=True)
    d = (mx - mn) / 31.0
    q = _c_uint8((b - mn) * _inv(d) + 0.5)
    return torch.cat([fp16_bytes(d[:, 0]), fp16_bytes(mn[:, 0]), _qh_bits(q), _nibbles(q & 0x0F)], dim=1)


def _q8(b: torch.Tensor):
    d = b.abs().amax(-1, keepdim=True) / 127.0
    q = _c_int8(round_away(b * _inv(d)))  # (nb, 32) int32 in [-128, 127]
    return d, q


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _q8(blocks_view(x, 32))
    return torch.cat([fp16_bytes(d[:, 0]), (q & 0xFF).to(torch.uint8)], dim=1)


def quantize_q8_1(x: torch.Tensor) -> torch.Tensor:
    d, q = _q8(blocks_view(x, 32))
    s = q.sum(-1).to(torch.float32) * d[:, 0]  # int sum is exact; one float multiply, as in C
    return torch.cat([fp16_bytes(d[:, 0]), fp16_bytes(s), (q & 0xFF).to(torch.uint8)], dim=1)


# -- dequantize: (nb, type_size) uint8 -> (nb, 32) float32 ----------------------------------------


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    qs = qs.to(torch.int32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _unqh(qh: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.int32)
    return ((qh.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(-1, 32)


def dequantize_q4_0(blk: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(blk[:, 0:2]).unsqueeze(1)
    return d * (_unnibble(blk[:, 2:18]) - 8).to(torch.float32)


def dequantize_q4_1(blk: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(blk[:, 0:2]).unsqueeze(1)
    m = fp16_from_bytes(blk[:, 2:4]).unsqueeze(1)
    return d * _unnibble(blk[:, 4:20]).to(torch.float32) + m


def dequantize_q5_0(blk: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(blk[:, 0:2]).unsqueeze(1)
    q = _unnibble(blk[:, 6:22]) | (_unqh(blk[:, 2:6]) << 4)
    return d * (q - 16).to(torch.float32)


def dequantize_q5_1(blk: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(blk[:, 0:2]).unsqueeze(1)
    m = fp16_from_bytes(blk[:, 2:4]).unsqueeze(1)
    q = _unnibble(blk[:, 8:24]) | (_unqh(blk[:, 4:8]) << 4)
    return d * q.to(torch.float32) + m


def dequantize_q8_0(blk: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(blk[:, 0:2]).unsqueeze(1)
    return blk[:, 2:34].contiguous().view(torch.int8).to(torch.float32) * d


def dequantize_q8_1(blk: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(blk[:, 0:2]).unsqueeze(1)  # bytes 2:4 hold s = d*sum(q), not needed here
    return blk[:, 4:36].contiguous().view(torch.int8).to(torch.float32) * d
