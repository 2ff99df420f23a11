"""What each compressed layer becomes in an ONNX export, and the float checkpoint the graph is built from.

* :func:`plan_layers` walks the model once, before anything is written: every packed QuantLinear /
  GPTQLinear of 2, 4 or 8 bits becomes ``MatMulNBits`` operands (:mod:`primitives.matmul_nbits`),
  act-order GPTQ layers with their columns sorted by group plus the input permutation; pruned
  Linears stay float (their masked weight). Anything ONNX cannot hold raises
  :class:`UnsupportedLayerError` naming the layer.
* :func:`write_float_source` writes a plain float32 Hugging Face directory (config without
  ``quantization_config``, safetensors, tokenizer) whose weights are exactly what our layers compute
  with (dequantized codes), for onnxruntime-genai's model builder to turn into a graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import InputError, UnsupportedLayerError
from ..nn.quant_linear import QuantLinear
from ..primitives.matmul_nbits import MATMUL_NBITS_BITS, NBitsWeight, block_size_for, to_matmul_nbits
from ..primitives.packing import unpack

FORMAT = "ONNX MatMulNBits"


@dataclass(frozen=True)
class NBitsLayer:
    weight: NBitsWeight
    dense: torch.Tensor  # (N, K) float32: what the layer computes with (the float source holds it)
    perm: torch.Tensor | None  # (K,) int64: act-order input permutation (x[..., perm]), else None
    scheme: str  # for the export's summary, e.g. "w4 g128 asym"


def _describe(bits: int, group_size: int, k: int, symmetric: bool, act_order: bool) -> str:
    g = "channel" if group_size >= k else f"g{group_size}"
    return f"w{bits} {g} {'sym' if symmetric else 'asym'}" + (" act-order" if act_order else "")


def _nbits_layer(name: str, m: QuantLinear) -> NBitsLayer:
    from ..nn.gptq_linear import GPTQLinear
    from ..primitives.act_order import sequential_group_size, sort_by_group

    if not m.is_packed:
        raise UnsupportedLayerError(name, FORMAT, "fake-quant (QAT) layer; call freeze_(model) first")
    bits, k = m.scheme.bits, m.in_features
    if bits not in MATMUL_NBITS_BITS:
        raise UnsupportedLayerError(name, FORMAT, f"{bits}-bit codes; MatMulNBits holds "
                                    + ", ".join(map(str, MATMUL_NBITS_BITS)) + " bits")
    qweight, group_size, perm = m.qweight, m.group_size, None
    if isinstance(m, GPTQLinear):
        n_groups = m.scale.shape[1]
        if sequential_group_size(m.g_idx, k, n_groups) is None:  # act-order: sort the columns by group
            layout = sort_by_group(m.qweight, m.g_idx, bits, k, n_groups)
            if layout is None:
                raise UnsupportedLayerError(name, FORMAT, "act-order groups of unequal sizes (g_idx is not a "
                                            "permutation of uniform groups)")
            qweight, group_size, perm = layout.qweight, layout.group_size, layout.perm
    block = block_size_for(group_size, k)
    if block is None:
        raise UnsupportedLayerError(name, FORMAT, f"group size {group_size}: MatMulNBits blocks are powers of "
                                    "two >= 16 (e.g. 32, 64, 128)")
    codes = unpack(qweight, bits, k)  # (N, K) uint8
    w = to_matmul_nbits(codes, m.scale, m.zero, bits, group_size, block)
    dense = m.dequantize(torch.float32)
    return NBitsLayer(w, dense, perm, _describe(bits, group_size, k, m.scheme.symmetric, perm is not None))


def plan_layers(model: nn.Module) -> tuple[dict[str, NBitsLayer], dict[str, torch.Tensor]]:
    """``(quantized layers -> MatMulNBits, other compressed layers -> dense float weight)``.
    Raises :class:`UnsupportedLayerError` for the first layer ONNX cannot hold."""
    from ..formats.checkpoint import MODULE_KINDS
    from ..nn.pruned_linear import PrunedLinear
    from ..nn.scheme_linear import SchemeLinear

    refused = tuple({cls for cls, _, _ in MODULE_KINDS.values()}) + (SchemeLinear,)
    nbits, dense = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            nbits[name] = _nbits_layer(name, m)
        elif isinstance(m, PrunedLinear):
            dense[name] = m.make_permanent().weight.detach().float()
        elif isinstance(m, refused):  # GGUF blocks, FP8 / NVFP4 / MXFP4 / W8A8, low-rank, LoRA
            raise UnsupportedLayerError(name, FORMAT, f"{type(m).__name__} ({_kind_reason(m)}) is not integer "
                                        "weight-only codes with affine groups, which is all MatMulNBits holds")
    return nbits, dense


def _kind_reason(m: nn.Module) -> str:
    qtype = getattr(m, "qtype", None)  # GGUF blocks
    if qtype is not None:
        return f"GGUF {getattr(qtype, 'name', qtype)} blocks"
    cfg = getattr(m, "config", None)  # FP8 / FP4 / W8A8 schemes
    if cfg is not None:
        return str(getattr(cfg, "format", type(cfg).__name__)).upper().replace("CONFIG", "")
    return "low-rank or adapter layer"


def _dense_state_dict(model: nn.Module, nbits: dict, dense: dict) -> dict[str, torch.Tensor]:
    """The model's state dict with every compressed layer's tensors replaced by ``weight`` (+ bias)."""
    replaced = {**{k: v.dense for k, v in nbits.items()}, **dense}
    sd, seen = {}, {}
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        if owner in replaced and not key.endswith(".bias"):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:  # tied embeddings: the config says so, one copy on disk
            continue
        seen[ident] = key
        sd[key] = t.detach().to(torch.float32).contiguous().cpu() if t.is_floating_point() else t.detach().cpu()
    for name, w in replaced.items():
        sd[f"{name}.weight"] = w.contiguous().cpu()
    return sd


def write_float_source(model: nn.Module, tokenizer, directory: Path, nbits: dict, dense: dict) -> None:
    """A float32 Hugging Face directory the model builder reads (weights = what our layers compute)."""
    from safetensors.torch import save_file

    if not (hasattr(model, "config") and hasattr(model.config, "to_dict")):
        raise InputError(f"{type(model).__name__}: ONNX export needs a Hugging Face causal LM (with .config)")
    if tokenizer is None:
        raise InputError("the model has no tokenizer; onnxruntime-genai needs one beside the ONNX model")
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    if not cfg.get("architectures"):  # a model built from a config (not loaded) has none; the builder keys on it
        cfg["architectures"] = [type(model).__name__]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if cfg.get("tie_word_embeddings") and out_emb is not None and isinstance(out_emb, QuantLinear):
        cfg["tie_word_embeddings"] = False  # a quantized head is its own tensor now
    sd = _dense_state_dict(model, nbits, dense)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
