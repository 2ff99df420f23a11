"""Linear layers bound once to the kernel that computes them, for the decoder's hot loop.

A decode step of a 30-block model makes about 200 linear calls of a few tens of microseconds each,
so the Python between a module and its kernel (the module's forward, ``run_op``, the backend
choice, the fast-path checks, the extension lookup) is a large share of the step. :func:`bind`
resolves all of that once per module and returns a callable that goes straight to the kernel the
module's own forward would run, with the same arguments: the result is the module's, bit for bit
(the tests check it). :func:`bind_rows` does the same for several layers that read the same input
(q/k/v, gate/up) and returns their outputs side by side from one native call.

Anything without a direct kernel (a float ``nn.Linear`` computes with ``F.linear``; LoRA, pruned,
low-rank wrappers; the reference backend forced by ``TORCHCOMPRESS_KERNEL``) is called as a module.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.backend import Backend, selected_backend
from ..ops.fastpath import GGUF_CPU_BLOCK, GGUF_GEMV_MAX_BATCH, gguf_panel_min_batch

Kernel = Callable[[torch.Tensor], torch.Tensor]  # (M, K) -> (M, N)


def _native():
    if selected_backend() is not Backend.AUTO:
        return None
    from ..ops.native import load_native

    return load_native()


def _gguf_args(mod, ext) -> tuple | None:
    """(blocks, bias, qtype, K, panel_min) when the native GGUF kernel computes ``mod`` on CPU."""
    block = GGUF_CPU_BLOCK.get(int(mod.qtype))
    if block is None or mod.blocks.device.type != "cpu" or mod.in_features % block:
        return None
    panel_min = gguf_panel_min_batch(ext, mod.qtype)
    bias = None if mod.bias is None else mod.bias.detach()
    return mod.blocks, bias, int(mod.qtype), mod.in_features, panel_min


def _int_args(mod) -> tuple | None:
    """(qweight, scale, zero, bias, bits, group_size, K) when the native int kernel computes ``mod``."""
    from ..ops.fastpath import CPU_BITS

    if not getattr(mod, "is_packed", False) or mod.scheme.bits not in CPU_BITS or mod.qweight.device.type != "cpu":
        return None
    if mod.zero is not None and mod.zero.dtype != torch.uint8:
        return None
    bias = None if mod.bias is None else mod.bias.detach()
    return mod.qweight, mod.scale, mod.zero, bias, mod.scheme.bits, mod.group_size, mod.in_features


def bind(mod: nn.Module) -> Kernel:
    """A callable computing ``mod(x)`` for 2-D float ``x`` on CPU, with the module's own kernel."""
    from ..nn.gguf_linear import GGUFLinear
    from ..nn.quant_linear import QuantLinear

    if type(mod) is nn.Linear:
        w, b = mod.weight, mod.bias
        return lambda x: F.linear(x, w, b)
    ext = _native()
    if ext is not None and type(mod) is GGUFLinear:
        args = _gguf_args(mod, ext)
        if args is not None:
            blocks, bias, qtype, k, panel_min = args
            fn = ext.gguf_linear
            return lambda x: fn(x, blocks, bias, qtype, k, "auto", "auto", GGUF_GEMV_MAX_BATCH, panel_min)
    if ext is not None and type(mod) is QuantLinear:
        args = _int_args(mod)
        if args is not None:
            fn = ext.int_linear
            return lambda x: fn(x, *args)
    return mod


def bind_rows(mods: Sequence[nn.Module]) -> Kernel:
    """A callable returning ``torch.cat([m(x) for m in mods], -1)``: one native call over all the
    layers' output rows (one parallel region) when every layer has a native kernel of one family,
    else one call per layer and a concatenation."""
    from ..nn.gguf_linear import GGUFLinear
    from ..nn.quant_linear import QuantLinear

    ext = _native()
    if ext is not None and len(mods) > 1 and len({m.in_features for m in mods}) == 1:
        if all(type(m) is GGUFLinear for m in mods) and hasattr(ext, "gguf_linear_rows"):
            args = [_gguf_args(m, ext) for m in mods]
            if all(a is not None for a in args):
                blocks, biases, qtypes = [a[0] for a in args], [a[1] for a in args], [a[2] for a in args]
                k, fn = mods[0].in_features, ext.gguf_linear_rows
                return lambda x: fn(x, blocks, biases, qtypes, k)
        if all(type(m) is QuantLinear for m in mods) and hasattr(ext, "int_linear_rows"):
            args = [_int_args(m) for m in mods]
            if all(a is not None for a in args):
                cols = list(zip(*args))  # qweights, scales, zeros, biases, bits, group sizes, K
                fn, k = ext.int_linear_rows, mods[0].in_features
                return lambda x: fn(x, *cols[:6], k)
    kernels = [bind(m) for m in mods]
    if len(kernels) == 1:
        return kernels[0]
    return lambda x: torch.cat([k(x) for k in kernels], dim=-1)
