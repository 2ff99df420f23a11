"""Fixtures: a saved tiny Llama directory with a tokenizer, and a small text file."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny Llama (random weights, seed 0) + tokenizer, as a transformers directory."""
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok))).eval()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "tiny.txt"
    from tests.tiny import TINY_TEXT

    p.write_text(TINY_TEXT)
    return p
