"""Import a llama.cpp .gguf (Llama architecture) as a transformers model that computes from the blocks.

    >>> model = load_gguf_model("model.Q4_K_M.gguf")     # LlamaForCausalLM with GGUFLinear layers
    >>> model(torch.tensor([[1, 2, 3]])).logits

Quantized linear weights become :class:`GGUFLinear` (the file's bytes, never expanded to float at load
time; rows of attn_q/attn_k are re-ordered back to Hugging Face's RoPE layout, which for row-wise
blocks is a pure row permutation), a quantized token embedding becomes :class:`GGUFEmbedding`, and
F32/F16 tensors (norms) load as float. Metadata and every tensor shape are checked against what the
hyperparameters imply; anything else is a :class:`FormatError` naming the file and the field.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import FormatError
from ..nn.gguf_linear import GGUFEmbedding, GGUFLinear
from ..primitives.gguf_blocks import dequantize
from ..primitives.gguf_common import GGMLType
from .gguf_file import VType
from .gguf_read import GGUFFile, read_gguf
from .gguf_write import _LAYER_MAP, unpermute_rope

_FLOAT = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
_INT_TYPES = (VType.UINT8, VType.INT8, VType.UINT16, VType.INT16, VType.UINT32, VType.INT32, VType.UINT64, VType.INT64)


def _get(g: GGUFFile, key: str, kind: str, default=None, lo: float = 1, hi: float = 1 << 24):
    kv = g.kv.get(key)
    if kv is None:
        if default is None:
            raise FormatError(g.path, f"missing metadata {key!r}")
        return default
    ok = kv.vtype in _INT_TYPES if kind == "int" else kv.vtype in (VType.FLOAT32, VType.FLOAT64)
    if not ok or not lo <= kv.value <= hi:
        raise FormatError(g.path, f"metadata {key!r} = {kv.value!r} ({kv.vtype.name}) is not a valid {kind} in [{lo}, {hi}]")
    return kv.value


def config_from_gguf(g: GGUFFile):
    from transformers import LlamaConfig

    arch = g.value("general.architecture")
    if arch != "llama":
        raise FormatError(g.path, f"general.architecture is {arch!r}; only 'llama' can be imported")
    if "token_embd.weight" not in g.tensors:
        raise FormatError(g.path, "missing tensor 'token_embd.weight'")
    vocab, hidden = g.tensors["token_embd.weight"].shape if len(g.tensors["token_embd.weight"].shape) == 2 else (0, 0)
    n_embd = _get(g, "llama.embedding_length", "int")
    n_head = _get(g, "llama.attention.head_count", "int", hi=4096)
    n_kv = _get(g, "llama.attention.head_count_kv", "int", default=n_head, hi=n_head)
    head_dim = _get(g, "llama.attention.key_length", "int", default=n_embd // n_head, hi=1 << 16)
    if hidden != n_embd or n_head % n_kv or head_dim % 2:
        raise FormatError(g.path, f"inconsistent shapes: embedding {hidden} vs {n_embd}, heads {n_head}/{n_kv}, head_dim {head_dim}")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):  # a string here fails deep in transformers
        if key in g.kv:
            _get(g, key, "int", lo=0, hi=max(vocab - 1, 0))
    try:
        return _llama_config(g, LlamaConfig, vocab, n_embd, n_head, n_kv, head_dim)
    except (ValueError, TypeError) as e:
        raise FormatError(g.path, f"hyperparameters rejected by transformers: {e}") from None


def _llama_config(g, LlamaConfig, vocab, n_embd, n_head, n_kv, head_dim):
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=n_embd,
        intermediate_size=_get(g, "llama.feed_forward_length", "int"),
        num_hidden_layers=_get(g, "llama.block_count", "int", hi=4096),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=_get(g, "llama.context_length", "int", hi=1 << 30),
        rms_norm_eps=float(_get(g, "llama.attention.layer_norm_rms_epsilon", "float", lo=0, hi=1)),
        rope_parameters={"rope_type": "default", "rope_theta": float(_get(g, "llama.rope.freq_base", "float", default=10000.0, lo=1e-3, hi=1e12))},
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=g.value("tokenizer.ggml.bos_token_id"),
        eos_token_id=g.value("tokenizer.ggml.eos_token_id"),
    )


def _expected(cfg) -> dict[str, tuple[str, tuple[int, ...], int | None]]:
    """gguf name -> (HF module path, shape, rope heads)."""
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {
        "attn_norm": (h,), "ffn_norm": (h,), "attn_q": (cfg.num_attention_heads * hd, h),
        "attn_k": (cfg.num_key_value_heads * hd, h), "attn_v": (cfg.num_key_value_heads * hd, h),
        "attn_output": (h, cfg.num_attention_heads * hd), "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f),
    }
    out = {"token_embd.weight": ("model.embed_tokens", (cfg.vocab_size, h), None),
           "output_norm.weight": ("model.norm", (h,), None)}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = ("lm_head", (cfg.vocab_size, h), None)
    for i in range(cfg.num_hidden_layers):
        for hf, gg in _LAYER_MAP.items():
            heads = cfg.num_attention_heads if gg == "attn_q" else cfg.num_key_value_heads if gg == "attn_k" else None
            out[f"blk.{i}.{gg}.weight"] = (f"model.layers.{i}.{hf}", shapes[gg], heads)
    return out


def load_gguf_model(path: str | os.PathLike) -> nn.Module:
    from transformers import LlamaForCausalLM

    g = read_gguf(Path(path))
    cfg = config_from_gguf(g)
    want = _expected(cfg)
    extra = sorted(set(g.tensors) - set(want))
    if extra:
        raise FormatError(g.path, f"unexpected tensor {extra[0]!r} for a Llama model")
    for name, (_, shape, _) in want.items():
        t = g.tensors.get(name)
        if t is None:
            raise FormatError(g.path, f"missing tensor {name!r}")
        if t.shape != shape:
            raise FormatError(g.path, f"tensor {name!r} has shape {t.shape}, the hyperparameters imply {shape}")
        if len(shape) == 1 and t.qtype not in _FLOAT:
            raise FormatError(g.path, f"tensor {name!r}: a norm must be F32/F16, got {t.qtype.name}")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    for name, (mod_path, shape, heads) in want.items():
        t = g.tensors[name]
        data = g.tensor_bytes(name).reshape(shape[0], -1) if len(shape) == 2 else g.tensor_bytes(name)
        parent, _, attr = mod_path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if heads is not None:  # row permutation back to HF's RoPE layout; rows are independent blocks
            perm = unpermute_rope(torch.arange(shape[0]).unsqueeze(1), heads)[:, 0]
            data = data.index_select(0, perm)
        if len(shape) == 1 or t.qtype in _FLOAT:
            w = dequantize(data, t.qtype, shape)
            old = getattr(owner, attr)
            old.weight = nn.Parameter(w, requires_grad=False)
            if hasattr(old, "bias") and old.bias is not None:
                old.bias = nn.Parameter(torch.zeros(shape[0]), requires_grad=False)
            continue
        if attr == "embed_tokens":
            mod = GGUFEmbedding(shape[0], shape[1], t.qtype, device="meta")
        else:
            mod = GGUFLinear(shape[1], shape[0], t.qtype, bias=False, device="meta")
        mod.blocks = data
        setattr(owner, attr, mod)
    if cfg.tie_word_embeddings:
        emb = model.model.embed_tokens
        if isinstance(emb, GGUFEmbedding):
            head = GGUFLinear(cfg.hidden_size, cfg.vocab_size, emb.qtype, device="meta")
            head.blocks = emb.blocks  # the same bytes, as llama.cpp uses token_embd for the output
            model.lm_head = head
        else:
            model.lm_head.weight = emb.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # inv_freq was built on meta
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise FormatError(g.path, f"{leftover[0]} was not filled from the file")
    return model.eval()
