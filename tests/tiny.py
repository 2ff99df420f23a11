"""Tiny random transformers models with a real (tiny, locally trained) tokenizer."""

from __future__ import annotations




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


