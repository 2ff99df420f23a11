"""Tiny random transformers models with a real (tiny, locally trained) tokenizer."""

from __future__ import annotations

import torch

TINY_TEXT = " ".join(
    f"The {a} {b} jumps over the {c} dog number {i}." for i, (a, b, c) in enumerate(
        [("quick", "brown", "lazy"), ("slow", "red", "happy"), ("small", "green", "sleepy")] * 40)
)


def tiny_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=256, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=True)
    base.update(kw)
    return LlamaConfig(**base)


def make_tokenizer(vocab_size: int = 256):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")




def calibrated_tiny_llama(hidden_size: int = 128, intermediate_size: int = 192, samples: int = 8, seq_len: int = 32):
    """(model, tokenizer, calibration set from pydoc) for tests of calibrated stages and their exports."""
    from transformers import LlamaForCausalLM

    from torchcompress.calibration import CalibrationConfig, build_calibration

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=hidden_size,
                                         intermediate_size=intermediate_size)).eval()
    calib = build_calibration(CalibrationConfig(sources=("pydoc",), num_samples=samples, seq_len=seq_len), model, tok)
    return model, tok, calib
