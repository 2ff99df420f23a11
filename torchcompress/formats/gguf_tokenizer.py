"""``tokenizer.ggml.*`` metadata: from a transformers byte-level BPE tokenizer, or copied from a .gguf.

llama.cpp token types: 1 normal, 2 unknown, 3 control (special added tokens), 4 user-defined
(non-special added tokens), 5 unused (padding ids past the tokenizer's own vocabulary), 6 byte.
"""

from __future__ import annotations

import json
import os

from ..errors import InputError
from .gguf_file import KV, VType

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


def _merges(tokenizer) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise InputError("GGUF export: the tokenizer has no fast (tokenizers) backend to read BPE merges from")
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE":
        raise InputError(f"GGUF export: only byte-level BPE tokenizers are supported, got {model.get('type')!r}")
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def tokenizer_kv(tokenizer, vocab_size: int, pre: str = "default") -> list[KV]:
    """Metadata llama.cpp needs to tokenize like ``tokenizer`` (``tokenizer.ggml.model = gpt2``)."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values(), default=-1) >= vocab_size:
        raise InputError(f"GGUF export: tokenizer ids go up to {max(vocab.values())} but the model has {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = NORMAL
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if i < vocab_size:
            types[i] = CONTROL if getattr(added, "special", False) else USER_DEFINED
    kv = [
        KV("tokenizer.ggml.model", VType.STRING, "gpt2"),
        KV("tokenizer.ggml.pre", VType.STRING, pre),
        KV("tokenizer.ggml.tokens", VType.ARRAY, tokens, VType.STRING),
        KV("tokenizer.ggml.token_type", VType.ARRAY, types, VType.INT32),
        KV("tokenizer.ggml.merges", VType.ARRAY, _merges(tokenizer), VType.STRING),
    ]
    for field, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        tid = getattr(tokenizer, f"{field}_token_id", None)
        if tid is not None:
            kv.append(KV(f"tokenizer.ggml.{key}_token_id", VType.UINT32, int(tid)))
    kv.append(KV("tokenizer.ggml.add_bos_token", VType.BOOL, bool(getattr(tokenizer, "add_bos_token", False))))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        kv.append(KV("tokenizer.chat_template", VType.STRING, template))  # stored, never rendered by us
    return kv


def tokenizer_kv_from_gguf(path: str | os.PathLike) -> list[KV]:
    """Every ``tokenizer.*`` key of another .gguf, verbatim (types included)."""
    from .gguf_read import read_gguf

    g = read_gguf(path)
    kv = [v for k, v in g.kv.items() if k.startswith("tokenizer.")]
    if not any(k.key == "tokenizer.ggml.tokens" for k in kv):
        raise InputError(f"{path}: has no tokenizer.ggml.tokens to copy")
    return kv
