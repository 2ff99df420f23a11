"""GGUF export in row chunks writes the same bytes as the whole-tensor export."""

import torch

from torchcompress.formats import gguf_write


def test_row_chunked_export_is_byte_identical(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=256, intermediate_size=512)).eval()
    whole = gguf_write.export_gguf(model, tok, tmp_path / "whole.gguf", "Q4_K_M").path.read_bytes()
    monkeypatch.setattr(gguf_write, "ROW_CHUNK", 48)  # 256/512-row tensors in 48-row chunks, the last partial
    chunked = gguf_write.export_gguf(model, tok, tmp_path / "chunked.gguf", "Q4_K_M").path.read_bytes()
    assert len(chunked) == len(whole) and chunked == whole
