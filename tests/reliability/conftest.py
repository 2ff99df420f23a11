import os

import pytest


@pytest.fixture(scope="module", autouse=True)
def _reference_kernels():
    """Fuzzers time every example (no_hang); the native CPU extension's first-use build (minutes on a
    cold cache) must not run inside that window, and these tests check loaders, not kernels."""
    old = os.environ.get("TORCHCOMPRESS_KERNEL")
    os.environ["TORCHCOMPRESS_KERNEL"] = "reference"
    yield
    if old is None:
        os.environ.pop("TORCHCOMPRESS_KERNEL", None)
    else:
        os.environ["TORCHCOMPRESS_KERNEL"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama (random weights, seed 0) + tokenizer, as a transformers directory."""
    import torch
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    LlamaForCausalLM(tiny_config(vocab_size=len(tok))).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A private copy of the tiny model directory, to plant hostile files in."""
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    return d
