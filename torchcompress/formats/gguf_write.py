"""Export a transformers Llama-family causal LM to a .gguf that llama.cpp loads.

    >>> from torchcompress.formats.gguf_write import export_gguf
    >>> res = export_gguf(model, tokenizer, "out/model.Q4_K_M.gguf", "Q4_K_M")
    >>> res.types["blk.0.ffn_down.weight"]
    <GGMLType.Q6_K: 14>

Tensor names and layouts follow llama.cpp's ``convert_hf_to_gguf.py`` for ``LlamaForCausalLM``:
``q_proj``/``k_proj`` rows are permuted from Hugging Face's rotate-half RoPE layout to the
interleaved pairs llama.cpp's ``rope`` (normal mode) expects; per-tensor types follow llama.cpp's
mixes (:mod:`gguf_mix`); each tensor is quantized, written and dropped in turn.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..primitives.gguf_blocks import IMATRIX_TYPES, quantize
from ..primitives.gguf_common import GGMLType
from .gguf_file import DEFAULT_ALIGNMENT, KV, TensorPlan, VType, write_gguf
from .gguf_mix import FileType, MixOptions, TypePlanner, parse_file_type

log = logging.getLogger(__name__)

ARCH = "llama"
ROW_CHUNK = 8192  # rows quantized at a time (bounded memory for big tensors)
_LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass
class ExportResult:
    path: Path
    file_size: int
    file_type: FileType
    types: dict[str, GGMLType] = field(default_factory=dict)


def file_kv(model, ft, name, tokenizer, tokenizer_from, tokenizer_pre, alignment: int) -> list:
    """The file's metadata: architecture hyperparameters, tokenizer (copied from ``tokenizer_from``'s
    .gguf, else built from ``tokenizer``), and a non-default alignment."""
    from .gguf_tokenizer import tokenizer_kv, tokenizer_kv_from_gguf

    if tokenizer_from is not None:
        tok_kv = tokenizer_kv_from_gguf(tokenizer_from)
    elif tokenizer is not None:
        tok_kv = tokenizer_kv(tokenizer, model.config.vocab_size, pre=tokenizer_pre)
    else:
        raise InputError("GGUF export needs a tokenizer (llama.cpp refuses models without one)")
    kvs = hparams_kv(model, ft, name) + tok_kv
    if alignment != DEFAULT_ALIGNMENT:
        kvs.append(KV("general.alignment", VType.UINT32, alignment))
    return kvs


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp interleaved pairs, per head. (n_head*D, K) -> same."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_rope` (used when reading a .gguf back)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    rtype = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rtype != "default":
        raise InputError(f"GGUF export: rope scaling {rtype!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise InputError("GGUF export: the model config has no rope_theta")
    return float(theta)


def _check_model(model) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        raise InputError(f"GGUF export supports Llama-family models (model_type 'llama'), got {getattr(cfg, 'model_type', type(model).__name__)!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise InputError("GGUF export: Llama models with attention/MLP biases are not supported")


def _float_weights(model) -> dict[str, torch.Tensor]:
    sd = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if not name.endswith("weight"):
            continue
        if not t.is_floating_point():
            raise InputError(f"GGUF export: {name} is not a float tensor ({t.dtype}); export the uncompressed model")
        sd[name] = t
    return sd


def _tensor_sources(model) -> list[tuple[str, str, int | None]]:
    """(gguf name, state_dict name, rope heads to permute or None), in llama.cpp's usual order."""
    cfg = model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = [("token_embd.weight", "model.embed_tokens.weight", None)]
    if not tied:
        out.append(("output.weight", "lm_head.weight", None))
    out.append(("output_norm.weight", "model.norm.weight", None))
    for i in range(cfg.num_hidden_layers):
        for hf, gg in _LAYER_MAP.items():
            heads = cfg.num_attention_heads if gg == "attn_q" else cfg.num_key_value_heads if gg == "attn_k" else None
            out.append((f"blk.{i}.{gg}.weight", f"model.layers.{i}.{hf}.weight", heads))
    return out


def hparams_kv(model, file_type: FileType, name: str | None) -> list[KV]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = [
        KV("general.architecture", VType.STRING, ARCH),
        KV("general.type", VType.STRING, "model"),
        KV("general.name", VType.STRING, name or str(getattr(cfg, "_name_or_path", "") or "model")),
        KV(f"{ARCH}.block_count", VType.UINT32, cfg.num_hidden_layers),
        KV(f"{ARCH}.context_length", VType.UINT32, cfg.max_position_embeddings),
        KV(f"{ARCH}.embedding_length", VType.UINT32, cfg.hidden_size),
        KV(f"{ARCH}.feed_forward_length", VType.UINT32, cfg.intermediate_size),
        KV(f"{ARCH}.attention.head_count", VType.UINT32, cfg.num_attention_heads),
        KV(f"{ARCH}.attention.head_count_kv", VType.UINT32, cfg.num_key_value_heads),
        KV(f"{ARCH}.rope.freq_base", VType.FLOAT32, _rope_theta(cfg)),
        KV(f"{ARCH}.attention.layer_norm_rms_epsilon", VType.FLOAT32, float(cfg.rms_norm_eps)),
        KV("general.file_type", VType.UINT32, int(file_type)),
        KV(f"{ARCH}.vocab_size", VType.UINT32, cfg.vocab_size),
        KV(f"{ARCH}.rope.dimension_count", VType.UINT32, head_dim),
    ]
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        kv += [KV(f"{ARCH}.attention.key_length", VType.UINT32, head_dim),
               KV(f"{ARCH}.attention.value_length", VType.UINT32, head_dim)]
    kv.append(KV("general.quantization_version", VType.UINT32, 2))
    return kv


def export_gguf(
    model,
    tokenizer,
    path: str | os.PathLike,
    qtype: str | FileType = "Q4_K_M",
    *,
    pure: bool = False,
    leave_output: bool = False,
    tokenizer_from: str | os.PathLike | None = None,
    tokenizer_pre: str = "default",
    name: str | None = None,
    alignment: int = DEFAULT_ALIGNMENT,
    importance: dict[str, torch.Tensor] | None = None,
    weights=None,
) -> ExportResult:
    """Write ``model`` (a float transformers Llama) as a .gguf of llama.cpp file type ``qtype``.

    Tokenizer metadata comes from ``tokenizer_from`` (a .gguf whose ``tokenizer.*`` keys are copied
    verbatim, e.g. the one the model was converted from) or else from the transformers ``tokenizer``
    (GPT-2 style byte-level BPE; ``tokenizer_pre`` names llama.cpp's pre-tokenizer).

    ``importance``: an imatrix (``{module name: (in_features,) mean squared activation}``, see
    :func:`torchcompress.calibration.imatrix.compute_imatrix`); tensors planned as K-quants or
    Q4_0/Q4_1/Q5_0/Q5_1 are then quantized with ggml's importance-weighted search
    (``quantize_<type>(..., quant_weights)``, as llama.cpp's quantizer does with ``--imatrix``).

    ``weights``: where tensors come from, a mapping read one name at a time (the block pipeline
    passes a checkpoint on disk and a meta-device ``model``: one tensor in memory at a time);
    default: the model's own float tensors.
    """

    _check_model(model)
    ft = qtype if isinstance(qtype, FileType) else parse_file_type(qtype)
    cfg = model.config
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    if weights is None:
        weights = _float_weights(model)
    sources = _tensor_sources(model)
    missing = [hf for _, hf, _ in sources if hf not in weights]
    if missing:
        raise InputError(f"GGUF export: the model has no {missing[0]} (not a standard LlamaForCausalLM layout)")
    n_gqa = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    planner = TypePlanner(MixOptions(ft, pure=pure, leave_output=leave_output, has_imatrix=importance is not None,
                                     n_gqa=n_gqa), cfg.num_hidden_layers,
                          tied="output.weight" not in {g for g, _, _ in sources})
    plans, by_name = [], {}
    for gg, hf, heads in sources:
        shape = shapes[hf]
        plans.append(TensorPlan(gg, shape, planner.choose(gg, shape)))
        by_name[gg] = (hf, heads)

    kvs = file_kv(model, ft, name, tokenizer, tokenizer_from, tokenizer_pre, alignment)

    def produce(plan: TensorPlan):
        hf, heads = by_name[plan.name]
        w = weights[hf].detach()
        if heads is not None:
            w = permute_rope(w, heads)  # permutes rows; the imatrix is per column, unchanged
        imp = None
        if importance is not None and plan.qtype in IMATRIX_TYPES:
            imp = importance.get(hf.removesuffix(".weight"))
        if w.dim() < 2 or w.shape[0] <= ROW_CHUNK:
            return quantize(w.to(torch.float32), plan.qtype, name=hf, importance=imp)
        # ggml quantizes each row on its own: a big tensor (an 8B model's 128256-row embedding is
        # 2 GB in float32) goes in row chunks, the same bytes with a bounded working set
        return (quantize(w[i: i + ROW_CHUNK].to(torch.float32), plan.qtype, name=hf, importance=imp)
                for i in range(0, w.shape[0], ROW_CHUNK))

    size = write_gguf(path, kvs, plans, produce, alignment)
    log.info("wrote %s (%s, %d bytes)", path, ft.name, size)
    return ExportResult(Path(path), size, ft, {p.name: p.qtype for p in plans})
