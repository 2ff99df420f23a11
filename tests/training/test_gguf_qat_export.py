"""GGUF QAT -> .gguf: the frozen GGUFLinear blocks are written verbatim; gguf-py (not ours) reads the
same bytes back, our loader rebuilds the same logits, llama.cpp runs it (slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchcompress as tc
from tests.tiny import make_tokenizer, tiny_config
from torchcompress.errors import InputError
from torchcompress.formats.gguf_write import permute_rope
from torchcompress.formats.gguf_write_blocks import export_gguf_blocks
from torchcompress.nn.gguf_linear import GGUFLinear
from torchcompress.primitives.gguf_common import GGMLType as G
from torchcompress.training.config import GGUFQATConfig
from torchcompress.training.loop import BatchSchedule, causal_lm_loss, train

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.hf


def _qat_model(qtype: str, tied: bool = False):
    from transformers import LlamaForCausalLM

    from torchcompress.distill import TrainSettings

    torch.manual_seed(0)
    tok = make_tokenizer(300)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                                         tie_word_embeddings=tied))
    tc.quantize_(model, GGUFQATConfig(qtype))
    ids = torch.randint(3, len(tok), (8, 16), generator=torch.Generator().manual_seed(1))
    train(model, BatchSchedule(ids, torch.ones_like(ids), 4, 0), causal_lm_loss,
          TrainSettings(steps=2, lr=1e-3, batch_size=4))
    tc.freeze_(model)
    return model.eval(), tok


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_export_writes_frozen_blocks_verbatim(tmp_path, qtype):
    model, tok = _qat_model(qtype)
    res = export_gguf_blocks(model, tok, tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 3 + 9 * 2 and res.file_size == (tmp_path / "m.gguf").stat().st_size
    for i in range(2):
        for hf, gg, heads in (("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                              ("mlp.down_proj", "ffn_down", None)):
            mod = model.get_submodule(f"model.layers.{i}.{hf}")
            assert isinstance(mod, GGUFLinear)
            t = tensors[f"blk.{i}.{gg}.weight"]
            assert G(int(t.tensor_type)) == mod.qtype == G[qtype]
            want = permute_rope(mod.blocks, heads) if heads else mod.blocks
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want.numpy())
    assert G(int(tensors["output.weight"].tensor_type)) == G.F32 and G(int(tensors["token_embd.weight"].tensor_type)) == G.F32


def test_our_loader_reads_back_the_same_model(tmp_path):
    from torchcompress.formats.gguf_load import load_gguf_model

    model, tok = _qat_model("Q4_0")
    export_gguf_blocks(model, tok, tmp_path / "m.gguf")
    back = load_gguf_model(tmp_path / "m.gguf").eval()
    assert torch.equal(back.model.layers[1].self_attn.q_proj.blocks, model.model.layers[1].self_attn.q_proj.blocks)
    ids = torch.randint(3, len(tok), (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_tied_model_with_quantized_head_writes_output_and_errors_are_typed(tmp_path):
    from transformers import LlamaForCausalLM

    model, tok = _qat_model("Q8_0", tied=True)
    res = export_gguf_blocks(model, tok, tmp_path / "tied.gguf")
    assert "output.weight" not in res.types  # lm_head stayed float and tied: llama.cpp reuses token_embd
    model.lm_head = GGUFLinear.from_linear(torch.nn.Linear(256, len(tok), bias=False), G.Q8_0)
    res = export_gguf_blocks(model, tok, tmp_path / "tied2.gguf")
    assert res.types["output.weight"] is G.Q8_0
    plain = LlamaForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=256, intermediate_size=512))
    with pytest.raises(InputError, match="no GGUFLinear"):
        export_gguf_blocks(plain, tok, tmp_path / "x.gguf")
    tc.quantize_(plain, tc.QuantScheme(bits=4, group_size=64))
    with pytest.raises(InputError, match="q_proj.weight is neither"):
        export_gguf_blocks(plain, tok, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_llamacpp_runs_the_qat_export(tmp_path):
    """Oracle: llama.cpp computes with our Q8_0 blocks (activations quantized to Q8_0 in its dot
    products, so not bit-equal): its logits match ours to the measured bound (9.7e-3 of the largest
    logit on this random 2-layer model; a wrong RoPE permutation or block layout gives O(1))."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok = _qat_model("Q8_0")
    export_gguf_blocks(model, tok, tmp_path / "m.gguf")
    # n_batch 1: llama-cpp-python 0.3.36 segfaults on a multi-token batch on this machine, with the
    # SmolLM2 file from its wheel too (AMX on or off), so the prompt goes one token at a time
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, n_batch=1, n_ubatch=1, logits_all=True,
                          verbose=False)
    ids = torch.randint(3, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(theirs - ours).max() / np.abs(ours).max()
    print(f"llama.cpp vs ours, Q8_0 QAT export: max |diff| / max |logit| = {err:.2e}")
    assert err < 2e-2
