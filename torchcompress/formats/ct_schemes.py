"""compressed-tensors entries of the weight-and-activation schemes (FP8, INT8 W8A8, NVFP4, MXFP4).

For each module: its ``config_groups`` entry (weights / input_activations args and the format) and its
tensors, named as compressed-tensors names them (our buffers already carry those names):

=============  =======================  =================================================================
scheme         format                   tensors
=============  =======================  =================================================================
FP8 channel    float-quantized          weight (N, K) float8_e4m3fn, weight_scale (N, 1) fp32
FP8 block      float-quantized /        weight, weight_scale (ceil(N/128), ceil(K/128)) fp32
               naive-quantized (W8A16)
INT8 W8A8      int-quantized            weight (N, K) int8, weight_scale (N, 1) fp32
NVFP4          nvfp4-pack-quantized     weight_packed (N, K/2) u8, weight_scale (N, K/16) e4m3,
                                        weight_global_scale (1,) [, input_global_scale (1,)]
MXFP4          mxfp4-pack-quantized     weight_packed (N, K/2) u8, weight_scale (N, K/32) u8 (e8m0)
=============  =======================  =================================================================
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..nn.scheme_linear import FP4Linear, FP8Linear, Int8Linear, SchemeLinear

SCHEME_MODULES = (SchemeLinear,)


def _args(num_bits: int, type_: str, strategy: str, *, dynamic=False, group_size=None, block=None,
          scale_dtype=None) -> dict:
    d = {"num_bits": num_bits, "type": type_, "symmetric": True, "strategy": strategy, "group_size": group_size,
         "block_structure": block, "dynamic": dynamic, "actorder": None,
         "observer": None if dynamic is True else "minmax"}
    if scale_dtype is not None:
        d["scale_dtype"] = d["zp_dtype"] = scale_dtype
    return d


def scheme_group(m: nn.Module) -> dict:
    """The ``config_groups`` entry (without targets) for one scheme module."""
    if isinstance(m, FP8Linear):
        bs = m.config.block_size
        if m.block is None:
            w = _args(8, "float", "channel")
            a = _args(8, "float", "token", dynamic=True) if m.act_dynamic else None
        else:
            w = _args(8, "float", "block", block=[bs, bs])
            a = _args(8, "float", "group", dynamic=True, group_size=bs) if m.act_dynamic else None
        fmt = "float-quantized" if a is not None else "naive-quantized"
    elif isinstance(m, Int8Linear):
        w = _args(8, "int", "channel")
        a = _args(8, "int", "token", dynamic=True)
        fmt = "int-quantized"
    elif isinstance(m, FP4Linear) and m.config.format == "nvfp4":
        w = _args(4, "float", "tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn")
        a = None
        if m.config.activations:
            a = _args(4, "float", "tensor_group", dynamic="local", group_size=16, scale_dtype="torch.float8_e4m3fn")
            a["observer"] = "static_minmax"
        fmt = "nvfp4-pack-quantized"
    elif isinstance(m, FP4Linear):
        w = _args(4, "float", "group", group_size=32, scale_dtype="torch.uint8")
        a = _args(4, "float", "group", dynamic=True, group_size=32, scale_dtype="torch.uint8") if m.config.activations else None
        fmt = "mxfp4-pack-quantized"
    else:
        raise TypeError(type(m).__name__)
    return {"weights": w, "input_activations": a, "output_activations": None, "format": fmt}


def scheme_tensors(name: str, m: nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors under their checkpoint names (buffers and bias, copied)."""
    out = {f"{name}.{k}": t.detach().contiguous().clone() for k, t in m.named_buffers()}
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().clone()
    return out
