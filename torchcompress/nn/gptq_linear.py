"""GPTQLinear: a packed :class:`QuantLinear` whose input columns map to groups through ``g_idx``.

GPTQ's act-order quantizes columns by decreasing Hessian diagonal and builds groups in that order,
so the group of column ``k`` is ``g_idx[k]`` (int32 buffer, (K,)), as in the GPTQ checkpoint
format. Results without act-order (or with static groups) have ``g_idx == arange(K) // group_size``
and go into a plain QuantLinear instead (:func:`module_from_gptq`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Granularity, QuantScheme
from ..errors import InputError
from ..ops.backend import run_op
from ..ops.gptq_linear import dequantize_g_idx_packed, gptq_linear_impl  # (importing it registers torchcompress::gptq_linear)
from ..primitives.act_order import sequential_group_size, sort_by_group
from ..primitives.packing import pack
from .quant_linear import QuantLinear


class GPTQLinear(QuantLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: QuantScheme = QuantScheme(),
                 *, device=None, dtype: torch.dtype | None = None):
        if scheme.granularity is not Granularity.GROUP:
            raise ValueError("GPTQLinear needs a group-wise scheme (g_idx maps columns to groups)")
        super().__init__(in_features, out_features, bias, scheme, device=device, dtype=dtype)
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32, device=device) // self.group_size)
        self.register_load_state_dict_post_hook(GPTQLinear._prepare_kernels)  # load time: the kernel layout once

    @classmethod
    def from_gptq(cls, linear: nn.Linear, result, scheme: QuantScheme) -> "GPTQLinear":
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, device="meta")
        mod.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        mod._set_buffers(result)
        return mod

    def _set_buffers(self, result) -> None:
        for key in ("qweight", "scale", "zero", "g_idx"):
            self._buffers.pop(key, None)
            self.__dict__.pop(key, None)
        self.register_buffer("qweight", pack(result.codes, self.scheme.bits))
        self.register_buffer("scale", result.scale.clone())
        if result.zero is None:
            self.zero = None
        else:
            self.register_buffer("zero", result.zero.clone())
        self.register_buffer("g_idx", result.g_idx.to(torch.int32).clone())
        self._prepare_kernels()  # pack time: the kernel layout once, not per forward

    def freeze(self):
        return self  # always packed

    def unfreeze(self):
        # act-order codes with g_idx have no fake-quant form here; QAT starts from a float Linear
        raise InputError("GPTQLinear cannot unfreeze (no float master weight); build an nn.Linear from dequantize()")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_g_idx_packed(self.qweight, self.scale, self.zero, self.g_idx, self.scheme.bits,
                                       self.in_features, dtype)

    def _kernel_layout(self) -> tuple:
        """``(sorted layout or None, kernel group size or 0)`` for the fast kernels.

        Act-order codes get their columns sorted by group (primitives/act_order.py; one more copy of
        the packed codes); a sequential ``g_idx`` its group size; non-uniform groups (0) the reference.
        Finding these reads ``g_idx`` back from the device, so it runs once: when the buffers are set
        (pack), after ``load_state_dict`` and after a device move, and again only when ``qweight`` or
        ``g_idx`` change (checked from host-side storage pointers and versions, no sync). While
        compiling, the cached values are used as they are."""
        cached = self.__dict__.get("_kernel_cache")
        if torch.compiler.is_compiling():
            return (None, 0) if cached is None else cached[1]
        qw, g = self.qweight, self.g_idx
        if qw.is_meta or g.is_meta:
            return None, 0
        key = (qw.data_ptr(), qw._version, qw.device, g.data_ptr(), g._version)
        if cached is not None and cached[0] == key:
            return cached[1]
        n_groups = self.scale.shape[1]
        layout, gs = None, sequential_group_size(g, self.in_features, n_groups) or 0
        if not gs:
            layout = sort_by_group(qw, g, self.scheme.bits, self.in_features, n_groups)
            gs = 0 if layout is None else layout.group_size
        self.__dict__["_kernel_cache"] = (key, (layout, gs))
        return layout, gs

    def _sorted_layout(self):
        """The act-order layout of :meth:`_kernel_layout` (None for sequential or non-uniform groups)."""
        return self._kernel_layout()[0]

    def _prepare_kernels(self, *args) -> None:
        self.__dict__.pop("_kernel_cache", None)
        if not self.qweight.is_meta:
            self._kernel_layout()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if "_kernel_cache" in self.__dict__:  # moved or cast: rebuild on the new device now, not in a forward
            self._prepare_kernels()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        layout, gs = self._kernel_layout()
        return run_op(torch.ops.torchcompress.gptq_linear, gptq_linear_impl,
                      x, self.qweight, self.scale, self.zero, self.g_idx, self.bias, self.scheme.bits, self.in_features,
                      None if layout is None else layout.perm, None if layout is None else layout.qweight, gs)

    def weight_bits(self) -> int:
        return super().weight_bits() + self.g_idx.numel() * 32

    def extra_repr(self) -> str:
        return super().extra_repr() + ", g_idx"


def gptq_linear_manifest(m: GPTQLinear) -> dict:
    d = {"type": "GPTQLinear", "in_features": m.in_features, "out_features": m.out_features,
         "bias": m.bias is not None, "scheme": m.scheme.to_dict()}
    if getattr(m, "gptq_info", None):
        d["gptq"] = dict(m.gptq_info)
    return d


def gptq_linear_from_manifest(entry: dict, device="meta") -> GPTQLinear:
    m = GPTQLinear(int(entry["in_features"]), int(entry["out_features"]), bool(entry["bias"]),
                   QuantScheme.from_dict(entry["scheme"]), device=device)
    if isinstance(entry.get("gptq"), dict):
        m.gptq_info = dict(entry["gptq"])
    return m


def gptq_run_info(result, config=None) -> dict:
    """What produced a GPTQ layer, for export metadata: kept on the module as ``gptq_info`` and in its
    manifest entry. ``config``: the stage's GPTQConfig (requested damping, true-sequential)."""
    info = {"act_order": bool(getattr(result, "act_order", False)),
            "static_groups": bool(getattr(result, "static_groups", False)),
            "observer": str(getattr(result, "observer", "minmax")),
            "fallback_rtn": bool(result.fallback)}
    used = float(result.damp)
    info["damp_used"] = None if used != used else used  # nan (RTN fallback) -> None
    if config is not None:
        info.update(damp=float(config.damp), true_sequential=bool(config.true_sequential),
                    block_size=int(config.block_size))
    return info


def module_from_gptq(linear: nn.Linear, result, scheme: QuantScheme, config=None) -> QuantLinear:
    """The smallest module that computes with ``result``: QuantLinear when groups are sequential.
    The module's ``gptq_info`` records the run (:func:`gptq_run_info`)."""
    mod = _module_from_gptq(linear, result, scheme)
    mod.gptq_info = gptq_run_info(result, config)
    return mod


def _module_from_gptq(linear: nn.Linear, result, scheme: QuantScheme) -> QuantLinear:
    if result.sequential_groups or scheme.granularity is not Granularity.GROUP:
        mod = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, scheme, device="meta")
        mod.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        for key in ("qweight", "scale", "zero"):
            mod._buffers.pop(key, None)
            mod.__dict__.pop(key, None)
        mod.register_buffer("qweight", pack(result.codes, scheme.bits))
        mod.register_buffer("scale", result.scale.clone())
        if result.zero is None:
            mod.zero = None
        else:
            mod.register_buffer("zero", result.zero.clone())
        return mod
    return GPTQLinear.from_gptq(linear, result, scheme)
