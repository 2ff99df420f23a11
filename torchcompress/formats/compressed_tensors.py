"""Export to compressed-tensors ``pack-quantized`` (as llm-compressor writes it; transformers and
vLLM load it with ``quant_method: compressed-tensors``).

Per quantized Linear ``name`` the checkpoint holds:

* ``name.weight_packed`` int32 (N, ceil(K*b/32)): the unsigned codes ``q + 2^(b-1)`` as one
  little-endian bit stream per row, which is exactly our :func:`..primitives.packing.pack` byte
  stream padded to whole 32-bit words;
* ``name.weight_scale`` (N, G); ``name.weight_shape`` int64 [N, K];
* asymmetric only: ``name.weight_zero_point`` int32, the signed zero point ``z - 2^(b-1)`` packed
  the same way along the output dimension (ceil(N*b/32), G);
Act-order results with non-sequential groups are refused (compressed-tensors removed that layout);
static groups (sequential ``g_idx``) export as plain group quantization.

One ``config_groups`` entry per distinct scheme, targeting its modules by exact name. FP8, INT8 W8A8,
NVFP4 and MXFP4 layers (:mod:`..nn.scheme_linear`) write the formats listed in :mod:`.ct_schemes`; a model
holding several formats is ``mixed-precision`` with each group naming its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from ..errors import FormatError
from ..nn.gptq_linear import GPTQLinear
from ..nn.quant_linear import QuantLinear
from .atomic import atomic_directory
from .checkpoint import write_hf_files
from .ct_convert import quant_group, quant_tensors
from .ct_schemes import SCHEME_MODULES, scheme_group, scheme_tensors

FORMAT = "pack-quantized"


def _weights_args(m: QuantLinear) -> dict:
    return quant_group(m.scheme)["weights"]


def _tensors(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    bias = None if m.bias is None else m.bias.detach()
    return quant_tensors(name, m.qweight, m.scale, m.zero, bias, m.scheme.bits, (m.out_features, m.in_features))


def save_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a Hugging Face model with packed QuantLinear/GPTQLinear layers as compressed-tensors."""
    from safetensors.torch import save_file

    if not (hasattr(model, "config") and hasattr(model.config, "to_dict")):
        raise FormatError(str(out_dir), "compressed-tensors export needs a Hugging Face model (with .config)")
    quant = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear,) + SCHEME_MODULES)}
    if not quant:
        raise FormatError(str(out_dir), "the model has no quantized Linear layer to export")
    groups: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in quant.items():
        if isinstance(m, SCHEME_MODULES):
            group = scheme_group(m)
            key = json.dumps(group, sort_keys=True)
            groups.setdefault(key, {"targets": [], **group})["targets"].append(name)
            tensors.update(scheme_tensors(name, m))
            continue
        if not m.is_packed:
            raise FormatError(name, "is a fake-quant QuantLinear; call freeze_(model) first")
        if isinstance(m, GPTQLinear) and not torch.equal(m.g_idx, torch.arange(m.in_features, dtype=torch.int32) // m.group_size):
            raise FormatError(name, "act-order groups (non-sequential g_idx) are not loadable by compressed-tensors "
                              "(actorder 'group' was removed); quantize with static_groups: true, or export GPTQ")
        args = _weights_args(m)
        if args["strategy"] == "group" and m.in_features % m.scheme.group_size:
            raise FormatError(name, f"in_features {m.in_features} is not a multiple of group_size "
                              f"{m.scheme.group_size}; compressed-tensors has no partial groups (use a group size "
                              "that divides every layer's width, e.g. 64 for SmolLM2)")
        key = json.dumps(args, sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": args, "input_activations": None,
                                "output_activations": None, "format": FORMAT})["targets"].append(name)
        tensors.update(_tensors(name, m))
    skip = tuple(f"{n}." for n in quant)
    seen = {}
    for key, t in model.state_dict().items():
        if key.startswith(skip):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen and t.numel():
            continue  # tied (lm_head = embeddings): transformers re-ties from tie_word_embeddings
        seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    ignore = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    from ..pipeline.experts import disk_namer, routers

    ignore += [n for n in routers(model) if n not in quant and n not in ignore]  # MoE routers stay float
    rename = disk_namer(model)  # MoE: the family's on-disk names (Mixtral's block_sparse_moe)
    if rename is not None:
        tensors = {rename(k): t for k, t in tensors.items()}
        ignore = [rename(n) for n in ignore]
        for g in groups.values():
            g["targets"] = [rename(n) for n in g["targets"]]
    formats = {g["format"] for g in groups.values()}
    qcfg = {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
            "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_hf_files(tmp, model, qcfg, tokenizer)
    return out_dir
