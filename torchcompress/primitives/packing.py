"""Bit packing of unsigned codes into compact uint8 storage, exact round trip.

Layout: each row is a little-endian bit stream; code ``i`` of a row occupies bits
``[i*b, (i+1)*b)``. A row of K codes takes ``ceil(K*b/8)`` bytes. For b=4 that is the usual
"low nibble first" layout, for b=8 the codes themselves. Widths 2 and 4 have direct paths;
other widths go through 64-bit words holding 8 codes each (8*b <= 56 bits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def packed_len(k: int, bits: int) -> int:
    return -(-k * bits // 8)


def _check(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError("bits", f"packing supports 1..8 bits, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., K) uint8 codes < 2^bits -> (..., ceil(K*bits/8)) uint8."""
    _check(bits)
    if codes.dtype != torch.uint8:
        raise ConfigError("codes", f"must be uint8, got {codes.dtype}")
    if bits == 8:
        return codes.clone()
    if codes.numel() and int(codes.max()) >= (1 << bits):
        # an oversized code would spill into its neighbour's bits
        raise ConfigError("codes", f"hold {int(codes.max())}, which does not fit in {bits} bits")
    k = codes.shape[-1]
    lead = codes.shape[:-1]
    out_len = packed_len(k, bits)
    if bits in (2, 4):
        per = 8 // bits
        v = F.pad(codes, (0, (-k) % per)).view(*lead, -1, per)
        out = v[..., 0].clone()
        for j in range(1, per):
            out |= v[..., j] << (j * bits)
        return out
    v = F.pad(codes, (0, (-k) % 8)).view(*lead, -1, 8).to(torch.int64)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (v << shifts).sum(-1, keepdim=True)  # (..., n, 1), 8*bits <= 56 bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)
    return out[..., :out_len].contiguous()


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (..., ceil(K*bits/8)) uint8 -> (..., K) uint8."""
    _check(bits)
    if packed.shape[-1] != packed_len(k, bits):
        raise ConfigError("packed", f"last dim {packed.shape[-1]} does not hold {k} codes of {bits} bits")
    if bits == 8:
        return packed.clone()
    lead = packed.shape[:-1]
    mask = (1 << bits) - 1
    if bits in (2, 4):
        per = 8 // bits
        parts = [(packed >> (j * bits)) & mask for j in range(per)]
        return torch.stack(parts, dim=-1).reshape(*lead, -1)[..., :k]
    n = -(-k // 8)
    b = F.pad(packed, (0, n * bits - packed.shape[-1])).view(*lead, n, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)  # (..., n, 1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = ((word >> shifts) & mask).to(torch.uint8).reshape(*lead, n * 8)
    return codes[..., :k]
