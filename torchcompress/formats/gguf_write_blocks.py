"""Export a Llama model whose Linears are already :class:`GGUFLinear` (GGUF QAT, ``kind: gguf``) to a
.gguf, writing each layer's blocks verbatim.

:func:`~torchcompress.formats.gguf_write.export_gguf` quantizes float weights; after QAT the blocks
*are* the model (freeze gives ``quantize(w_trained)``), so re-deriving them is neither needed nor
possible from a saved compressed model (it has no float weight). Here every ``GGUFLinear`` tensor is
written as its bytes (attn_q/attn_k rows permuted to llama.cpp's RoPE layout: each row is whole
blocks, so permuting rows of bytes equals quantizing permuted rows); every other tensor (embeddings,
norms, a float ``lm_head``) is written in ``float_type`` (F32 default: exactly the model we evaluate).

    >>> tc.quantize_(model, GGUFQATConfig("Q4_0")); train(...); tc.freeze_(model)
    >>> export_gguf_blocks(model, tokenizer, "out/model.Q4_0.gguf")
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import torch

from ..errors import InputError
from ..primitives.gguf_blocks import quantize
from ..primitives.gguf_common import GGMLType
from .gguf_file import DEFAULT_ALIGNMENT, TensorPlan, write_gguf
from .gguf_mix import FileType
from .gguf_write import ExportResult, _check_model, _tensor_sources, file_kv, permute_rope

log = logging.getLogger(__name__)

# general.file_type to announce for the most common block type (metadata only; llama.cpp reads each
# tensor's own type)
_FILE_TYPE = {GGMLType.Q4_0: FileType.Q4_0, GGMLType.Q4_1: FileType.Q4_1, GGMLType.Q5_0: FileType.Q5_0,
              GGMLType.Q5_1: FileType.Q5_1, GGMLType.Q8_0: FileType.Q8_0, GGMLType.Q2_K: FileType.Q2_K,
              GGMLType.Q3_K: FileType.Q3_K_S, GGMLType.Q4_K: FileType.Q4_K_S, GGMLType.Q5_K: FileType.Q5_K_S,
              GGMLType.Q6_K: FileType.Q6_K, GGMLType.IQ4_NL: FileType.IQ4_NL, GGMLType.IQ4_XS: FileType.IQ4_XS}


def export_gguf_blocks(
    model,
    tokenizer,
    path: str | os.PathLike,
    *,
    float_type: GGMLType = GGMLType.F32,
    tokenizer_from: str | os.PathLike | None = None,
    tokenizer_pre: str = "default",
    name: str | None = None,
    alignment: int = DEFAULT_ALIGNMENT,
) -> ExportResult:
    """Write ``model`` (a transformers Llama with GGUFLinear layers) as a .gguf; see the module doc."""
    from ..nn.gguf_linear import GGUFEmbedding, GGUFLinear

    _check_model(model)
    float_type = GGMLType(float_type)
    if float_type not in (GGMLType.F32, GGMLType.F16):
        raise InputError(f"GGUF export: float_type must be F32 or F16, got {float_type.name}")
    sources = _tensor_sources(model)
    if "output.weight" not in {g for g, _, _ in sources} and isinstance(getattr(model, "lm_head", None), GGUFLinear):
        sources.insert(1, ("output.weight", "lm_head.weight", None))  # tied in config, quantized apart: llama.cpp uses it
    sd = model.state_dict()
    plans, by_name = [], {}
    for gg, hf, heads in sources:
        mod_name = hf.removesuffix(".weight")
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            raise InputError(f"GGUF export: the model has no {mod_name} (not a standard LlamaForCausalLM layout)") from None
        if isinstance(mod, (GGUFLinear, GGUFEmbedding)):  # (an embedding: a model read from a quantized .gguf)
            shape = (mod.out_features, mod.in_features) if isinstance(mod, GGUFLinear) else (mod.num_embeddings, mod.embedding_dim)
            plans.append(TensorPlan(gg, shape, mod.qtype))
            by_name[gg] = (mod, heads)
            continue
        w = sd.get(hf)
        if w is None or not w.is_floating_point():
            raise InputError(f"GGUF export: {hf} is neither a GGUFLinear nor a float weight "
                             f"({type(mod).__name__}); export integer-quantized models with --format gptq")
        plans.append(TensorPlan(gg, tuple(w.shape), float_type if w.dim() == 2 else GGMLType.F32))
        by_name[gg] = (w, heads)
    counts = Counter(p.qtype for p in plans if isinstance(by_name[p.name][0], GGUFLinear))
    if not counts:
        raise InputError("GGUF export: the model has no GGUFLinear layer; export a float model with export_gguf")
    ft = _FILE_TYPE[counts.most_common(1)[0][0]]

    kvs = file_kv(model, ft, name, tokenizer, tokenizer_from, tokenizer_pre, alignment)

    def produce(plan: TensorPlan) -> torch.Tensor:
        src, heads = by_name[plan.name]
        if isinstance(src, (GGUFLinear, GGUFEmbedding)):
            data = src.blocks.detach().cpu()
            return permute_rope(data, heads) if heads is not None else data
        w = src.detach().to(torch.float32).cpu()
        if heads is not None:
            w = permute_rope(w, heads)
        return quantize(w, plan.qtype, name=plan.name)

    size = write_gguf(path, kvs, plans, produce, alignment)
    log.info("wrote %s (%s blocks, %d bytes)", path, ft.name, size)
    return ExportResult(Path(path), size, ft, {p.name: p.qtype for p in plans})
