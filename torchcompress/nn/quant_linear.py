"""QuantLinear: an ``nn.Linear`` whose weight is stored as packed integer codes + scales (+ zeros).

Two states:

* **packed** (inference): buffers ``qweight`` (N, ceil(K*bits/8)) uint8, ``scale`` (N, G) or (1, 1),
  ``zero`` (N, G) uint8 for asymmetric schemes; the forward is one op, ``torchcompress::int_linear``.
* **fake-quant** (QAT): a float master ``weight`` parameter; the forward quantizes it on the fly with a
  straight-through estimator so gradients reach the master weight. :meth:`freeze` packs it.

:meth:`use_kmajor_layout` keeps a pre-shuffled working copy of the codes for the CUDA ``tl.dot``
kernel (:mod:`~torchcompress.primitives.kernel_layout`); it is not a buffer: ``state_dict`` and saved
files stay exactly as without it.

Example::

    ql = QuantLinear.from_linear(nn.Linear(576, 1536), QuantScheme(bits=4, group_size=128))
    y = ql(torch.randn(2, 576))
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Granularity, QuantScheme
from ..errors import ConfigError, NumericError
from ..ops.backend import run_op
from ..ops.int_linear import dequantize_packed, int_linear_impl  # (importing it registers torchcompress::int_linear)
from ..primitives.affine import effective_group_size, num_groups, quantize_affine
from ..primitives.packing import pack, packed_len
from .ste import fake_quantize_ste


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        scheme: QuantScheme = QuantScheme(),
        *,
        qat: bool = False,
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for field, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(field, f"must be a positive integer, got {v!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.group_size = effective_group_size(scheme, in_features)
        fk = {"device": device, "dtype": dtype or torch.float32}
        self.bias = nn.Parameter(torch.zeros(out_features, **fk)) if bias else None
        if qat:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
        else:
            self.weight = None
            self._alloc_packed(device)

    # -- construction -------------------------------------------------------------------------

    def _qparam_shape(self) -> tuple[int, int]:
        if self.scheme.granularity is Granularity.TENSOR:
            return (1, 1)
        return (self.out_features, num_groups(self.in_features, self.group_size))

    def _alloc_packed(self, device) -> None:
        n, k, bits = self.out_features, self.in_features, self.scheme.bits
        self.register_buffer("qweight", torch.zeros(n, packed_len(k, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(self._qparam_shape(), dtype=self.scheme.torch_scale_dtype, device=device))
        if self.scheme.symmetric:
            self.zero = None
        else:
            zdt = self.scheme.torch_scale_dtype if self.scheme.float_zero else torch.uint8
            self.register_buffer("zero", torch.zeros(self._qparam_shape(), dtype=zdt, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, *, qat: bool = False, name: str = "weight",
                    learnable_scale: bool = False) -> "QuantLinear":
        """Quantize ``linear`` (RTN) into a new QuantLinear; ``name`` labels errors (NaN/Inf weights).
        ``learnable_scale`` (QAT only): LSQ step sizes, initialised to the RTN scales (see nn/lsq.py)."""
        w = linear.weight.detach()
        if w.numel() == 0:  # name the tensor before the shape check in __init__ would
            raise NumericError(name, f"is empty (shape {tuple(w.shape)})")
        has_bias = linear.bias is not None
        mod = cls(linear.in_features, linear.out_features, has_bias, scheme, qat=True, device="meta")
        mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad) if has_bias else None
        if qat:
            from ..primitives.affine import check_finite

            check_finite(w, name)
            mod.weight = nn.Parameter(w.clone())
            if learnable_scale:
                mod._init_lsq()
        else:
            mod.weight = None
            mod._set_packed_from(w, name)
        return mod

    @classmethod
    def from_quantized(cls, linear: nn.Linear, scheme: QuantScheme, q) -> "QuantLinear":
        """A packed QuantLinear from ``linear``'s bias and codes/scales/zeros computed elsewhere (an
        ``AffineQuantized`` in this layer's layout, e.g. from HQQ)."""
        has_bias = linear.bias is not None
        mod = cls(linear.in_features, linear.out_features, has_bias, scheme, qat=True, device="meta")
        mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad) if has_bias else None
        mod.weight = None
        mod._set_packed(q)
        return mod

    def _set_packed_from(self, w: torch.Tensor, name: str) -> None:
        self._set_packed(quantize_affine(w, self.scheme, name=name))

    def _set_packed(self, q) -> None:
        want = (self.out_features, self.in_features)
        if tuple(q.codes.shape) != want or q.group_size != self.group_size or tuple(q.scale.shape) != self._qparam_shape():
            raise ConfigError("codes", f"shape {tuple(q.codes.shape)} / group {q.group_size} does not fit this layer {want}")
        for key in ("qweight", "scale", "zero"):
            self._buffers.pop(key, None)
            self.__dict__.pop(key, None)
        self.register_buffer("qweight", pack(q.codes, self.scheme.bits))
        self.register_buffer("scale", q.scale)
        if q.zero is None:
            self.zero = None
        else:
            self.register_buffer("zero", q.zero)
        self._refresh_kmajor()

    @torch.no_grad()
    def _init_lsq(self) -> None:
        """LSQ: a float ``weight_scale`` parameter (RTN init) and fixed integer-valued ``weight_zero``."""
        from ..primitives.affine import compute_qparams

        scale, zero, _ = compute_qparams(self.weight.detach(), self.scheme)
        self.weight_scale = nn.Parameter(scale.float())
        self.register_buffer("weight_zero", None if zero is None else zero.float())

    @property
    def learnable_scale(self) -> bool:
        return getattr(self, "weight_scale", None) is not None

    def _fake_quant_weight(self) -> torch.Tensor:
        if self.learnable_scale:
            from .lsq import lsq_fake_quantize

            return lsq_fake_quantize(self.weight, self.weight_scale, self.weight_zero, self.scheme, self.group_size)
        return fake_quantize_ste(self.weight, self.scheme)

    def _set_packed_lsq(self, w: torch.Tensor, name: str) -> None:
        from ..primitives.affine import check_finite, quantize_with_qparams, sanitize_scale

        check_finite(w, name)
        check_finite(self.weight_scale.detach(), f"{name}_scale")
        if bool((self.weight_scale <= 0).any()):
            raise NumericError(f"{name}_scale", "a learned step size is <= 0 (learning rate too high for the scales?)")
        scale = sanitize_scale(self.weight_scale.detach().float(), self.scheme.torch_scale_dtype)
        zero = None if self.weight_zero is None else self.weight_zero.round().to(torch.uint8)
        codes = quantize_with_qparams(w, scale, zero, self.scheme.bits, self.group_size)
        for key in ("qweight", "scale", "zero"):
            self._buffers.pop(key, None)
            self.__dict__.pop(key, None)
        self.register_buffer("qweight", pack(codes, self.scheme.bits))
        self.register_buffer("scale", scale)
        if zero is None:
            self.zero = None
        else:
            self.register_buffer("zero", zero)

    # -- state changes ------------------------------------------------------------------------

    @property
    def is_packed(self) -> bool:
        return self.weight is None

    @torch.no_grad()
    def freeze(self, name: str = "weight") -> "QuantLinear":
        """Fake-quant -> packed: quantize the master weight and drop it. No-op when already packed.
        ``name`` labels errors (a NaN master weight after training)."""
        if not self.is_packed:
            w = self.weight.detach()
            if self.learnable_scale:  # pack with the learned step sizes, not fresh RTN ones
                self._set_packed_lsq(w, name)
                del self.weight_scale
                del self.weight_zero
            else:
                self._set_packed_from(w, name)  # raises before anything changes
            del self.weight
            self.weight = None
            self._refresh_kmajor()
        return self

    @torch.no_grad()
    def unfreeze(self) -> "QuantLinear":
        """Packed -> fake-quant, with the dequantized weight as the new master weight (for QAT)."""
        if self.is_packed:
            w = self.dequantize(self.bias.dtype if self.bias is not None else torch.float32)
            for key in ("qweight", "scale", "zero"):
                self._buffers.pop(key, None)
            self.zero = None
            self.weight = nn.Parameter(w)
            self._refresh_kmajor()
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight this layer computes with."""
        if not self.is_packed:
            return self._fake_quant_weight().detach().to(dtype)
        return dequantize_packed(
            self.qweight, self.scale, self.zero, self.scheme.bits, self.group_size, self.in_features, dtype
        )

    # -- kernel layout (a working copy, never saved) ----------------------------------------

    def use_kmajor_layout(self, on: bool = True) -> "QuantLinear":
        """Keep (or drop) the K-major copy of ``qweight`` that the CUDA ``tl.dot`` kernel reads with
        coalesced loads. Built now, and again after ``load_state_dict``, a device move or a re-pack;
        costs one more copy of the packed codes in memory. Needs 2/4/8-bit codes in rows and groups of
        whole int32 words (``ConfigError`` otherwise)."""
        from ..primitives.kernel_layout import kmajor_supported

        if on and not kmajor_supported(self.scheme.bits, self.in_features, self.group_size):
            raise ConfigError("kernel_layout", f"K-major words need 2/4/8 bits and in_features / group_size multiples "
                                               f"of {32 // self.scheme.bits if 32 % self.scheme.bits == 0 else 'a word'}; "
                                               f"this layer has bits={self.scheme.bits}, in_features={self.in_features}, "
                                               f"group_size={self.group_size}")
        self.__dict__["_kmajor"] = bool(on)
        if on and not self.__dict__.get("_kmajor_hook"):
            self.__dict__["_kmajor_hook"] = self.register_load_state_dict_post_hook(
                lambda mod, incompatible: mod._refresh_kmajor())
        self._refresh_kmajor()
        return self

    def _refresh_kmajor(self, *args) -> None:
        self.__dict__["_qweight_kn"] = None
        if self.__dict__.get("_kmajor") and self.is_packed and not self.qweight.is_meta:
            from ..primitives.kernel_layout import to_kmajor

            self.__dict__["_qweight_kn"] = to_kmajor(self.qweight, self.scheme.bits, self.in_features)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.__dict__.get("_kmajor"):  # moved or cast: rebuild on the new device now, not in a forward
            self._refresh_kmajor()
        return out

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if not self.is_packed:
            w = self._fake_quant_weight()
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return run_op(torch.ops.torchcompress.int_linear, int_linear_impl,
                      x, self.qweight, self.scale, self.zero, self.bias, self.scheme.bits, self.group_size, self.in_features,
                      self.__dict__.get("_qweight_kn"))

    def weight_bits(self) -> int:
        """Bits this layer's weight occupies (codes, scales, zeros); the bias is not counted."""
        if not self.is_packed:
            return self.weight.numel() * self.weight.element_size() * 8
        zero_bits = 0 if self.zero is None else self.zero.numel() * self.zero.element_size() * 8
        return self.qweight.numel() * 8 + self.scale.numel() * self.scale.element_size() * 8 + zero_bits

    def extra_repr(self) -> str:
        s = self.scheme
        gran = f"group_size={self.group_size}" if s.granularity is Granularity.GROUP else s.granularity.value
        state = "packed" if self.is_packed else "fake-quant"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={s.bits}, {gran}, symmetric={s.symmetric}, {state}"
        )


def quant_linear_manifest(m: QuantLinear) -> dict:
    """JSON-able description from which :func:`quant_linear_from_manifest` rebuilds an empty twin."""
    d = {
        "type": "QuantLinear",
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "scheme": m.scheme.to_dict(),
    }
    if getattr(m, "gptq_info", None):  # quantized by GPTQ (sequential groups): how, for export metadata
        d["gptq"] = dict(m.gptq_info)
    return d


def quant_linear_from_manifest(entry: dict, device="meta") -> QuantLinear:
    m = QuantLinear(
        int(entry["in_features"]), int(entry["out_features"]), bool(entry["bias"]),
        QuantScheme.from_dict(entry["scheme"]), device=device,
    )
    if isinstance(entry.get("gptq"), dict):
        m.gptq_info = dict(entry["gptq"])
    return m
