"""FP4 (e2m1) block quantization: NVFP4 and MXFP4.

e2m1 values: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; a 4-bit code is ``sign << 3 | index``
(index into that list). Rounding is to the nearest grid value, ties to the even index (IEEE style:
0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4); beyond 6 saturates.
Two codes per byte along a row, the first in the low nibble.

* **NVFP4**: blocks of 16 inputs; each block has an e4m3 scale relative to one fp32 *global scale*
  per tensor, ``gs = 448 * 6 / max|x|``. The stored block scale is ``e4m3(gs * max|block| / 6)``
  and the effective one ``e4m3_scale / gs``. Activations: the global scale comes from calibration
  (static), the block scales are computed per token at forward time.
* **MXFP4** (OCP microscaling): blocks of 32 inputs with a power-of-two scale stored as an e8m0
  exponent byte (``2^(byte - 127)``). The exponent is ``floor(log2(amax))`` (amax first rounded
  to one mantissa bit, so a block whose maximum would land at 7 or above in e2m1 units gets the next
  power of two) minus 2, the exponent of e2m1's largest value 6: the block maximum lands in [3.5, 7)
  and the clipping error stays below half of the top step.

Example::

    packed, scale, gs = quantize_nvfp4(w)                 # (N, K/2) u8, (N, K/16) e4m3, (1,) fp32
    w_hat = dequantize_nvfp4(packed, scale, gs)
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .affine import check_finite
from .fp8 import E4M3_MAX, to_e4m3

E2M1_MAX = 6.0
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_MIDPOINTS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2  # 0.25 0.75 1.25 1.75 2.5 3.5 5
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
_TINY = torch.finfo(torch.float32).tiny


# -- the e2m1 grid ----------------------------------------------------------------------------

def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Float values (already divided by their scale) -> 4-bit codes uint8 (nearest, ties to even)."""
    a = x.float().abs().clamp(max=E2M1_MAX)
    mid = _MIDPOINTS.to(a.device)
    down = torch.bucketize(a, mid, right=False)  # ties resolved to the lower index
    up = torch.bucketize(a, mid, right=True)  # ties resolved to the upper index
    idx = torch.where(down % 2 == 0, down, up)  # differ only on a tie: keep the even one
    sign = (x < 0) & (idx > 0)  # no negative zero code
    return (idx | (sign.to(idx.dtype) << 3)).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes -> float32 values."""
    v = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -v, v)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes, K even -> (N, K/2) uint8, element 2i in the low nibble of byte i."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _check_blocks(k: int, block: int, name: str) -> None:
    if k % block:
        raise ConfigError(name, f"in_features {k} is not a multiple of the FP4 block size {block}")


# -- NVFP4 ------------------------------------------------------------------------------------

def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 (1,) global scale ``448 * 6 / amax`` (1 for an all-zero tensor)."""
    a = amax.float().reshape(1)
    gs = ((E4M3_MAX * E2M1_MAX) / a.clamp(min=_TINY)).clamp(max=torch.finfo(torch.float32).max)
    return torch.where(a > 0, gs, torch.ones_like(a))


def _nvfp4_codes(x: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # x (..., K) fp32 -> codes (..., K), e4m3 block scales (..., K/16), effective scales (..., K/16, 1)
    g = x.unflatten(-1, (-1, NVFP4_BLOCK))  # (..., K/16, 16)
    s8 = to_e4m3(g.abs().amax(dim=-1) / E2M1_MAX * gs)  # (..., K/16) saturates at 448
    eff = (s8.float() / gs).unsqueeze(-1)
    safe = torch.where(eff > 0, eff, torch.ones_like(eff))  # a block scale of 0 holds only zeros
    codes = torch.where(eff > 0, e2m1_codes(g / safe), torch.zeros((), dtype=torch.uint8))
    return codes.flatten(-2), s8, eff


def quantize_nvfp4(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) -> (packed (N, K/2) uint8, block scales (N, K/16) float8_e4m3fn, global scale (1,) fp32)."""
    check_finite(w, name)
    _check_blocks(w.shape[1], NVFP4_BLOCK, name)
    wf = w.detach().float()
    gs = nvfp4_global_scale(wf.abs().amax())
    codes, s8, _ = _nvfp4_codes(wf, gs)
    return pack_fp4(codes), s8, gs


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    v = e2m1_values(unpack_fp4(packed))  # (N, K)
    eff = scale.float() / global_scale.float()  # (N, K/16)
    return (v.unflatten(-1, (-1, NVFP4_BLOCK)) * eff.unsqueeze(-1)).flatten(-2).to(dtype)


def nvfp4_qdq(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Activation quant-dequant (..., K): dynamic e4m3 block scales under a static global scale."""
    xf = x.float()
    codes, _, eff = _nvfp4_codes(xf, global_scale.float())
    return (e2m1_values(codes).unflatten(-1, (-1, NVFP4_BLOCK)) * eff).flatten(-2)


# -- MXFP4 ------------------------------------------------------------------------------------

def mx_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Block maxima -> unbiased int32 scale exponents (see module docstring), in [-127, 127]."""
    a = amax.float()
    m, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1): mantissa 1.x = 2m, exponent e - 1
    e = e - 1 + (m >= 0.875).to(e.dtype)  # 1.x >= 1.75 rounds up to the next power of two
    e = torch.where(a > 0, e - 2, torch.full_like(e, -127))  # 2 = floor(log2(6)); zero blocks: any scale
    return e.clamp(-127, 127).to(torch.int32)


def _mx_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = x.unflatten(-1, (-1, MXFP4_BLOCK))
    e = mx_exponent(g.abs().amax(dim=-1))  # (..., K/32)
    scale = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e).unsqueeze(-1)
    return e2m1_codes(g / scale).flatten(-2), e


def quantize_mxfp4(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> (packed (N, K/2) uint8, e8m0 scale bytes (N, K/32) uint8 = exponent + 127)."""
    check_finite(w, name)
    _check_blocks(w.shape[1], MXFP4_BLOCK, name)
    codes, e = _mx_codes(w.detach().float())
    return pack_fp4(codes), (e + 127).to(torch.uint8)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    v = e2m1_values(unpack_fp4(packed))
    s = torch.ldexp(torch.ones(scale.shape), scale.to(torch.int32) - 127)  # (N, K/32)
    return (v.unflatten(-1, (-1, MXFP4_BLOCK)) * s.unsqueeze(-1)).flatten(-2).to(dtype)


def mxfp4_qdq(x: torch.Tensor) -> torch.Tensor:
    """Activation quant-dequant (..., K), dynamic power-of-two scales per block of 32."""
    codes, e = _mx_codes(x.float())
    scale = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e).unsqueeze(-1)
    return (e2m1_values(codes).unflatten(-1, (-1, MXFP4_BLOCK)) * scale).flatten(-2)
