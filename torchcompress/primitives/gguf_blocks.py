"""GGUF block formats as pure tensor functions: ``quantize`` to bytes, ``dequantize`` from bytes.

Bit-exact with ggml's reference quantizers (``quantize_row_*_ref``); see :mod:`gguf_legacy` and
:mod:`gguf_kquants` for the per-type math and layouts.

    >>> data = quantize(torch.randn(8, 512), GGMLType.Q4_K)    # (8, 2*144) uint8
    >>> w = dequantize(data, GGMLType.Q4_K, (8, 512))          # (8, 512) float32

``quantize`` runs the native kernel (``kernels/cpu/gguf_quant.cpp``, byte-identical, multithreaded)
when it is built, and the vectorized PyTorch reference otherwise or with
``TORCHCOMPRESS_KERNEL=reference``. Importance weights (llama.cpp's imatrix, one value per column)
select ggml's importance-weighted quantizers (K-quants and Q4_0/Q4_1/Q5_0/Q5_1), natively or in the
PyTorch reference of :mod:`gguf_imatrix` (bit-exact with each other, much slower).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, NumericError
from . import gguf_iquants as _i
from . import gguf_kquants as _k
from . import gguf_legacy as _l
from .gguf_common import LAYOUTS, GGMLType, row_bytes

_QUANT = {
    GGMLType.Q4_0: _l.quantize_q4_0,
    GGMLType.Q4_1: _l.quantize_q4_1,
    GGMLType.Q5_0: _l.quantize_q5_0,
    GGMLType.Q5_1: _l.quantize_q5_1,
    GGMLType.Q8_0: _l.quantize_q8_0,
    GGMLType.Q8_1: _l.quantize_q8_1,
    GGMLType.Q2_K: _k.quantize_q2_k,
    GGMLType.Q3_K: _k.quantize_q3_k,
    GGMLType.Q4_K: _k.quantize_q4_k,
    GGMLType.Q5_K: _k.quantize_q5_k,
    GGMLType.Q6_K: _k.quantize_q6_k,
    GGMLType.IQ4_NL: _i.quantize_iq4_nl,
    GGMLType.IQ4_XS: _i.quantize_iq4_xs,
}
_DEQUANT = {
    GGMLType.Q4_0: _l.dequantize_q4_0,
    GGMLType.Q4_1: _l.dequantize_q4_1,
    GGMLType.Q5_0: _l.dequantize_q5_0,
    GGMLType.Q5_1: _l.dequantize_q5_1,
    GGMLType.Q8_0: _l.dequantize_q8_0,
    GGMLType.Q8_1: _l.dequantize_q8_1,
    GGMLType.Q2_K: _k.dequantize_q2_k,
    GGMLType.Q3_K: _k.dequantize_q3_k,
    GGMLType.Q4_K: _k.dequantize_q4_k,
    GGMLType.Q5_K: _k.dequantize_q5_k,
    GGMLType.Q6_K: _k.dequantize_q6_k,
    GGMLType.IQ4_NL: _i.dequantize_iq4_nl,
    GGMLType.IQ4_XS: _i.dequantize_iq4_xs,
}


def can_quantize(qtype: GGMLType, n_per_row: int) -> bool:
    return n_per_row % LAYOUTS[GGMLType(qtype)].block_size == 0


_KQUANTS = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
# types with an importance-weighted quantizer in ggml (Q8_0 accepts and ignores the weights, as ggml does)
# llama.cpp's non-linear 4-bit types (primitives/gguf_iquants.py): PyTorch only, no native quantizer yet
IQUANTS = (GGMLType.IQ4_NL, GGMLType.IQ4_XS)
IMATRIX_TYPES = _KQUANTS + (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1) + IQUANTS


def _native_op():
    """``torch.ops.tc_gguf.quantize`` when the native extension is usable, else None."""
    from ..ops.backend import Backend, selected_backend

    if selected_backend() is Backend.REFERENCE:
        return None
    from ..ops.native import load_native

    if load_native() is None:
        return None
    try:
        return torch.ops.tc_gguf.quantize
    except (AttributeError, RuntimeError):  # an installed extension built before gguf_quant.cpp
        return None


def quantize(
    x: torch.Tensor, qtype: GGMLType, name: str = "tensor", importance: torch.Tensor | None = None
) -> torch.Tensor:
    """(..., K) float -> (..., row_bytes) uint8 in ggml's layout for ``qtype`` (F32/F16/BF16 too).

    ``importance``: optional (K,) non-negative weights per column (llama.cpp's imatrix), giving
    ``quantize_<type>(..., quant_weights)``'s bytes for the K-quants and Q4_0/Q4_1/Q5_0/Q5_1; Q8_0
    ignores it (as ggml does); Q8_1 and float types reject it.
    """
    qtype = GGMLType(qtype)
    if x.numel() == 0:
        raise NumericError(name, "is empty")
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    # one contiguous float32 copy (a no-op for contiguous float32 input); every check and kernel
    # reads that, never a strided view (a strided sum alone costs more than the quantizer)
    x = x.detach().reshape(-1, k).to(torch.float32).contiguous()
    # a finite sum means no NaN/Inf (either would propagate); only a non-finite (or overflowing)
    # sum pays for the elementwise check, which costs more than the native quantizer itself
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise NumericError(name, "contains NaN or Inf; refusing to quantize")
    if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        dt = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}[qtype]
        return x.to(dt).view(torch.uint8).reshape(*lead, -1)
    if qtype not in _QUANT:
        raise ConfigError("qtype", f"cannot quantize to {qtype.name}")
    if not can_quantize(qtype, k):
        raise ConfigError(
            "qtype", f"{name}: rows of {k} weights are not a multiple of {qtype.name}'s block of {LAYOUTS[qtype].block_size}"
        )
    if importance is not None:
        importance = _check_importance(importance, qtype, k, name)
    op = None if qtype in IQUANTS else _native_op()
    if op is not None:
        out = op(x, int(qtype), importance)
    else:
        out = quantize_reference(x, qtype, importance)
    return out.reshape(*lead, row_bytes(qtype, k))


def quantize_reference(x: torch.Tensor, qtype: GGMLType, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The pure-PyTorch quantizer for (R, K) float ``x`` (what ``quantize`` falls back to);
    ``importance`` (K,) selects ggml's weighted quantizer (Q8_0 ignores it, as ggml does)."""
    qtype = GGMLType(qtype)
    k = x.shape[-1]
    if importance is not None:
        importance = _check_importance(importance, qtype, k, "tensor")
    if qtype in IQUANTS:  # one function for both paths (importance or None), as in ggml
        return _QUANT[qtype](x.reshape(-1, k), importance).reshape(-1, row_bytes(qtype, k))
    if importance is not None and qtype in IMATRIX_TYPES:
        from .gguf_imatrix import quantize_imatrix

        return quantize_imatrix(x.reshape(-1, k), qtype, importance)
    return _QUANT[qtype](x.reshape(-1, k)).reshape(-1, row_bytes(qtype, k))


def _check_importance(imp: torch.Tensor, qtype: GGMLType, k: int, name: str) -> torch.Tensor:
    if qtype not in IMATRIX_TYPES + (GGMLType.Q8_0,):
        raise ConfigError("importance", f"{name}: {qtype.name} has no importance-weighted quantizer")
    imp = imp.detach().to(torch.float32).reshape(-1).contiguous()
    if imp.numel() != k:
        raise ConfigError("importance", f"{name}: {imp.numel()} importance weights for rows of {k} columns")
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise NumericError(f"{name}.importance", "must be finite and non-negative")
    return imp


def dequantize(data: torch.Tensor, qtype: GGMLType, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 bytes of a ``qtype`` tensor with logical ``shape`` -> float32 tensor of that shape."""
    qtype = GGMLType(qtype)
    shape = tuple(int(s) for s in shape)
    k = shape[-1]
    n = 1
    for s in shape:
        n *= s
    flat = data.reshape(-1).contiguous()
    if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        dt = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}[qtype]
        return flat.view(dt).to(torch.float32).reshape(shape)
    if qtype not in _DEQUANT:
        raise ConfigError("qtype", f"cannot dequantize {qtype.name}")
    lay = LAYOUTS[qtype]
    if k % lay.block_size or flat.numel() != n // lay.block_size * lay.type_size:
        raise ConfigError("data", f"{flat.numel()} bytes do not hold a {qtype.name} tensor of shape {shape}")
    return _DEQUANT[qtype](flat.reshape(-1, lay.type_size)).reshape(shape)
