"""Per-channel max |input| of chosen Linears over calibration data, with removable forward hooks.

Only real tokens count (``attention_mask`` 1). Used by SmoothQuant (per channel) and NVFP4
(per tensor: the max of the channels) on the whole in-memory model; the block pipeline gathers the
same statistic per block.

Example::

    stats = input_absmax(model, ["model.layers.0.self_attn.q_proj"], calib)   # {name: (K,) fp32}
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError, NumericError


@torch.no_grad()
def input_absmax(model: nn.Module, names: list[str], calib, batch_size: int = 8) -> dict[str, torch.Tensor]:
    if calib is None:
        raise ConfigError("calib_data", "activation statistics need calibration data: pass a CalibrationSet "
                          "(torchcompress.calibration.build_calibration) or use the CLI's --calib")
    stats: dict[str, torch.Tensor] = {}
    mask_now: list = [None]  # the current batch's attention mask (B, L), read by the hooks

    def hook(name):
        def fn(_mod, args, _out):
            x = args[0].detach()  # (B, L, K)
            m = mask_now[0]
            rows = x[m.bool()] if m is not None and m.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            if not bool(torch.isfinite(rows).all()):
                raise NumericError(f"{name}:input", "calibration activations hold NaN/Inf")
            amax = rows.float().abs().amax(dim=0) if rows.numel() else torch.zeros(x.shape[-1])
            prev = stats.get(name)
            stats[name] = amax if prev is None else torch.maximum(prev, amax)
        return fn

    dev = next(model.parameters()).device
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for ids, mask in calib.batches(batch_size):
            mask_now[0] = mask.to(dev)
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in stats]
    if missing:
        raise ConfigError("targets", f"{missing[0]} never ran on the calibration data")
    return stats
