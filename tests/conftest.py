"""Shared fixtures. Never touches the network: the HF tests build tiny random models from configs."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub; tests must never download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Triton reads TRITON_INTERPRET once, when it is first imported, and torch imports it early (the
# first custom-op call loads torch._dynamo). Without CUDA the Triton kernels run in the interpreter.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_llama_config(tie_word_embeddings: bool = True, hidden_size: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )


@pytest.fixture
def tiny_llama():
    """Factory: ``tiny_llama(tied=True, hidden_size=64)`` -> a random LlamaForCausalLM in eval mode."""

    def make(tied: bool = True, hidden_size: int = 64):
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama_config(tied, hidden_size)).eval()

    return make


@pytest.fixture
def token_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 12), generator=g)
