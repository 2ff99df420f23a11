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

import os
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


# RMSNorm classes whose forward is x * rsqrt(mean(x^2) + eps) * weight computed in fp32
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def rms_params(mod: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a Llama-style RMSNorm with fp32 weights on CPU, else None."""
    w = getattr(mod, "weight", None)
    eps = getattr(mod, "variance_epsilon", None)
    if type(mod).__name__ in RMS_NORMS and w is not None and w.dtype == torch.float32 and eps is not None:
        if w.device.type == "cpu":
            return w.detach(), float(eps)
    return None


class _NotNative(Exception):
    pass


def native_plan(dec, layers: Sequence[nn.Module], isa: str = "auto"):
    """The native ``DecodePlan`` running a whole decode step of ``dec``'s blocks in one call, or None
    when a part has no native kernel (a float or wrapped linear layer, another norm, a bf16 model, no
    AVX2, the extension unavailable, ``TORCHCOMPRESS_DECODE_STEP=0``): the decoder then runs its
    per-op path. The plan reads the modules' own packed tensors and writes ``dec``'s KV caches.
    ``isa``: the instruction set of its row kernels (``auto`` = the best this CPU has)."""
    from ..nn.gguf_linear import GGUFLinear
    from ..nn.quant_linear import QuantLinear

    if os.environ.get("TORCHCOMPRESS_DECODE_STEP", "1") == "0":
        return None
    ext = _native()
    if ext is None or not hasattr(ext, "DecodePlan") or ext.available_isas()[0] == "portable":
        return None
    if dec.k_cache.dtype != torch.float32 or dec.k_cache.device.type != "cpu":
        return None
    hidden = dec.embed.weight.shape[-1] if hasattr(dec.embed, "weight") else None
    hidden = hidden or getattr(dec.model.config, "hidden_size")
    plan = ext.DecodePlan(hidden, dec.n_heads, dec.n_kv, dec.head_dim, dec.scaling, dec.cos[0].contiguous(),
                          dec.sin[0].contiguous(), dec.k_cache, dec.v_cache, isa)

    def lin(mod) -> int:
        if type(mod) is GGUFLinear:
            args = _gguf_args(mod, ext)
            if args is not None:
                blocks, bias, qtype, k, _ = args
                return plan.add_gguf(blocks, bias, qtype, k)
        if type(mod) is QuantLinear:
            args = _int_args(mod)
            if args is not None and args[4] in (4, 8):
                qweight, scale, zero, bias, bits, group, k = args
                try:
                    return plan.add_int(qweight, scale, zero, bias, bits, group, k)
                except RuntimeError:  # a layout without a SIMD kernel (odd 4-bit groups)
                    raise _NotNative from None
        raise _NotNative

    def norm(mod) -> tuple[torch.Tensor, float]:
        p = rms_params(mod)
        if p is None:
            raise _NotNative
        return p

    try:
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            n1, e1 = norm(layer.input_layernorm)
            n2, e2 = norm(layer.post_attention_layernorm)
            qn = kn = None
            qk_eps = 0.0
            if getattr(attn, "q_norm", None) is not None:
                qn, qk_eps = norm(attn.q_norm)
                kn, _ = norm(attn.k_norm)
            qkv = [lin(attn.q_proj), lin(attn.k_proj), lin(attn.v_proj)]
            o = lin(attn.o_proj)
            gate_up = [lin(mlp.gate_proj), lin(mlp.up_proj)]
            down = lin(mlp.down_proj)
            plan.add_layer(n1, e1, qkv, qn, kn, qk_eps, o, n2, e2, gate_up, down)
    except _NotNative:
        return None
    return plan
