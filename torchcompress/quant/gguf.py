"""GGUF block quantization as a model transform and recipe stage (``kind: gguf``).

    >>> quantize_gguf_(model, GGUFConfig("Q4_K_M"))   # nn.Linear -> GGUFLinear, llama.cpp's mix

Each selected ``nn.Linear`` becomes a :class:`GGUFLinear` holding exactly the bytes a .gguf of that
file type would hold: for Llama-family module names the per-tensor types follow llama.cpp's mix
(``ffn_down``/``attn_v`` upgrades, shape fallbacks; see :mod:`torchcompress.formats.gguf_mix`),
other Linears get the file type's default block type with the same shape fallback. Modules of a
Llama model's attention keep Hugging Face's row order (the RoPE permutation is applied on export,
and for row-wise blocks it only reorders rows, so the blocks are the same).
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Iterable

import torch.nn as nn

from ..errors import ConfigError
from ..formats.gguf_mix import MixOptions, TypePlanner, parse_file_type
from ..nn.gguf_linear import GGUFLinear
from ..primitives.gguf_common import GGMLType
from ..targets import select_modules, set_submodule
from .gguf_config import GGUFConfig

log = logging.getLogger(__name__)

_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def gguf_name(module_name: str) -> str:
    """HF module name -> the llama.cpp tensor name the mix rules key on (best effort)."""
    if module_name.split(".")[-1] == "lm_head":
        return "output.weight"
    m = _LAYER_RE.search(module_name)
    if m and m.group(2) in _HF_TO_GGUF:
        return f"blk.{m.group(1)}.{_HF_TO_GGUF[m.group(2)]}.weight"
    return f"{module_name}.weight"


def gguf_planner(config: GGUFConfig, n_layer: int, model: nn.Module | None = None) -> TypePlanner:
    """llama.cpp's per-tensor type rules for a model of ``n_layer`` decoder blocks (``model``'s config
    gives the query heads per KV head, which some rules read)."""
    mcfg = getattr(model, "config", None)
    heads = getattr(mcfg, "num_attention_heads", None)
    n_gqa = heads // (getattr(mcfg, "num_key_value_heads", None) or heads) if heads else 1
    return TypePlanner(MixOptions(parse_file_type(config.qtype), config.pure, config.leave_output,
                                  has_imatrix=bool(getattr(config, "imatrix", False)), n_gqa=n_gqa), n_layer, tied=False)


def quantize_gguf_(
    model: nn.Module,
    config: GGUFConfig,
    *,
    targets: Iterable = (nn.Linear,),
    ignore: Iterable = ("re:.*embed.*",),
    on_module: Callable[[str, nn.Module, nn.Module], None] | None = None,
    calib=None,
    planner: TypePlanner | None = None,
) -> nn.Module:
    """Replace the chosen ``nn.Linear`` layers by ``GGUFLinear`` with llama.cpp's per-tensor types.

    With ``config.imatrix``, ``calib`` (a CalibrationSet) gives every layer's imatrix first (one
    float forward pass over it) and types with a weighted quantizer use it.
    """
    if ignore is None:  # a recipe stage without `ignore:` means the verb's default
        ignore = ("re:.*embed.*",)
    chosen = [(n, m) for n, m in select_modules(model, targets, ignore) if type(m) is nn.Linear]
    if not chosen:
        log.warning("gguf: no nn.Linear matched targets=%r ignore=%r", targets, ignore)
    n_layer = 1 + max((int(m.group(1)) for n, _ in chosen if (m := _LAYER_RE.search(n))), default=0)
    if planner is None:
        planner = gguf_planner(config, n_layer, model)
    # llama.cpp counts attn_v tensors in layer order; visit in that order
    chosen.sort(key=lambda nm: (int(m.group(1)) if (m := _LAYER_RE.search(nm[0])) else -1, nm[0]))
    imat: dict = {}
    if getattr(config, "imatrix", False):
        if calib is None:
            raise ConfigError("imatrix", "the gguf stage's imatrix needs calibration data (--calib)")
        from ..calibration.imatrix import compute_imatrix
        from ..primitives.gguf_blocks import IMATRIX_TYPES

        names = {n for n, _ in chosen}
        imat = compute_imatrix(model, calib, include=names.__contains__, process_output=True)
    for name, linear in chosen:
        qt = planner.choose(gguf_name(name), tuple(linear.weight.shape))
        if qt in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
            continue  # left in float (leave_output, or rows that fit no block)
        imp = imat.get(name) if imat and qt in IMATRIX_TYPES else None
        new = GGUFLinear.from_linear(linear, qt, name=f"{name}.weight", importance=imp)
        set_submodule(model, name, new)
        if on_module is not None:
            on_module(name, linear, new)
    return model
