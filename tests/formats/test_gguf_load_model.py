"""models.load_model on a .gguf: keep_quantized=True keeps the blocks (GGUFLinear), the default path still
dequantizes through transformers; both compute the same function."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import make_tokenizer, tiny_config
from torchcompress.formats.gguf_write import export_gguf
from torchcompress.models import load_model
from torchcompress.nn.gguf_linear import GGUFEmbedding, GGUFLinear

pytest.importorskip("gguf")


def test_load_model_keep_quantized(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer(300)
    cfg = tiny_config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, tie_word_embeddings=False)
    export_gguf(LlamaForCausalLM(cfg).eval(), tok, tmp_path / "m.gguf", "Q8_0")

    q = load_model(tmp_path / "m.gguf", keep_quantized=True)
    assert isinstance(q.model.model.layers[0].mlp.down_proj, GGUFLinear)
    assert isinstance(q.model.model.embed_tokens, GGUFEmbedding)
    assert q.tokenizer is not None and "GGUF blocks kept" in q.description
    assert q.tokenizer("hello world")["input_ids"]

    f = load_model(tmp_path / "m.gguf")  # unchanged default: float weights via transformers
    assert type(f.model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(q.model(ids).logits, f.model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_default_model_keep_quantized():
    lm = load_model("default", keep_quantized=True)
    assert sum(isinstance(m, GGUFLinear) for m in lm.model.modules()) >= 7 * lm.model.config.num_hidden_layers
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1]:])
