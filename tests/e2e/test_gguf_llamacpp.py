"""Oracle: llama.cpp itself (llama-cpp-python) runs our exports. Slow; skipped without llama_cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def test_llamacpp_logits_match_transformers_on_f32_export(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config
    from torchcompress.formats.gguf_write import export_gguf

    torch.manual_seed(0)
    tok = make_tokenizer(300)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                                         tie_word_embeddings=False)).eval()
    export_gguf(model, tok, tmp_path / "m.gguf", "F32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False)
    ids = torch.randint(3, model.config.vocab_size, (12,)).tolist()
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    # same float weights; differences are llama.cpp's own kernels (measured ~1e-5)
    assert np.abs(ours - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_default_tokenizer_metadata_built_from_hf_matches_source_gguf():
    from torchcompress.formats.gguf_read import read_gguf
    from torchcompress.formats.gguf_tokenizer import tokenizer_kv
    from torchcompress.models import default_gguf_path, load_model

    src = read_gguf(default_gguf_path())
    lm = load_model("default")
    built = {kv.key: kv.value for kv in tokenizer_kv(lm.tokenizer, lm.model.config.vocab_size, pre="smollm")}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre"):
        assert built[key] == src.value(key), key
