"""GGUF export: layout read back by gguf-py, model read back by transformers' own GGUF loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import make_tokenizer, tiny_config
from torchcompress.errors import ConfigError, InputError
from torchcompress.formats.gguf_mix import FileType, MixOptions, TypePlanner
from torchcompress.formats.gguf_write import export_gguf, permute_rope, unpermute_rope
from torchcompress.primitives.gguf_blocks import quantize
from torchcompress.primitives.gguf_common import GGMLType as G

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer(300)
    cfg = tiny_config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), tok


def test_permute_rope_matches_definition():
    H, D, K = 3, 8, 5
    w = torch.randn(H * D, K)
    p = permute_rope(w, H)
    for h in range(H):
        for j in range(D // 2):  # llama.cpp pairs (x[2j], x[2j+1]) = HF's (x[j], x[j + D/2])
            assert torch.equal(p[h * D + 2 * j], w[h * D + j])
            assert torch.equal(p[h * D + 2 * j + 1], w[h * D + D // 2 + j])
    assert torch.equal(unpermute_rope(p, H), w)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", pytest.param("Q4_K_M", marks=pytest.mark.slow), pytest.param("Q5_K_S", marks=pytest.mark.slow)])
def test_export_reads_back_with_gguf_py(tiny, tmp_path, qtype):
    model, tok = tiny
    out = tmp_path / f"m.{qtype}.gguf"
    res = export_gguf(model, tok, out, qtype)
    r = gguf.GGUFReader(str(out))
    assert out.stat().st_size == res.file_size
    f = r.fields
    assert bytes(f["general.architecture"].parts[-1]) == b"llama"
    assert int(f["general.file_type"].parts[-1][0]) == int(FileType[qtype])
    assert int(f["llama.block_count"].parts[-1][0]) == 2
    assert int(f["llama.attention.head_count_kv"].parts[-1][0]) == 2
    assert len(f["tokenizer.ggml.tokens"].data) == model.config.vocab_size
    assert len(f["tokenizer.ggml.merges"].data) > 0
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 3 + 9 * 2
    sd = model.state_dict()
    for name, t in tensors.items():
        assert G(int(t.tensor_type)) == res.types[name]
        assert t.data_offset % 32 == 0
    # every weight: gguf-py's dequantization of our bytes == our quantization of the (permuted) weight
    t = tensors["blk.1.attn_k.weight"]
    w = permute_rope(sd["model.layers.1.self_attn.k_proj.weight"], 2)
    ours = quantize(w, res.types["blk.1.attn_k.weight"]).numpy()
    assert np.array_equal(np.asarray(t.data).reshape(ours.shape), ours)
    assert tuple(int(x) for x in t.shape) == (256, 128)  # ggml ne order: (cols, rows)


def test_transformers_loads_our_f32_export_exactly(tiny, tmp_path):
    """transformers' GGUF loader (not ours) undoes names and Q/K permutation: same logits."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    export_gguf(model, tok, tmp_path / "m.gguf", "F32")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_mix_rules_smollm2_shapes():
    # SmolLM2-135M: 30 layers, hidden 576 (not a multiple of 256), ffn 1536, tied embeddings
    p = TypePlanner(MixOptions(FileType.Q4_K_M), n_layer=30, tied=True)
    assert p.choose("token_embd.weight", (49152, 576)) == G.Q8_0
    assert p.choose("output_norm.weight", (576,)) == G.F32
    got = {}
    for i in range(30):
        for n, shape in [("attn_q", (576, 576)), ("attn_k", (192, 576)), ("attn_v", (192, 576)),
                         ("attn_output", (576, 576)), ("ffn_gate", (1536, 576)), ("ffn_up", (1536, 576)),
                         ("ffn_down", (576, 1536))]:
            got[f"{i}.{n}"] = p.choose(f"blk.{i}.{n}.weight", shape)
    more = [i for i in range(30) if i < 3 or i >= 26 or (i - 3) % 3 == 2]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    for i in range(30):
        assert got[f"{i}.attn_q"] == got[f"{i}.ffn_up"] == G.Q5_0  # Q4_K falls back to Q5_0 for 576
        assert got[f"{i}.attn_v"] == (G.Q8_0 if i in more else G.Q5_0)  # Q6_K -> Q8_0 fallback
        assert got[f"{i}.ffn_down"] == (G.Q6_K if i in more else G.Q4_K)  # 1536 = 6 x 256 fits


def test_mix_rules_other_types():
    shapes = {"token_embd.weight": (1000, 512), "output.weight": (1000, 512), "blk.0.attn_v.weight": (128, 512),
              "blk.0.ffn_down.weight": (512, 1024), "blk.5.ffn_down.weight": (512, 1024)}

    def plan(ft, **kw):
        p = TypePlanner(MixOptions(ft, **kw), n_layer=16, tied=False)
        return {n: p.choose(n, s) for n, s in shapes.items()}

    s = plan(FileType.Q4_K_S)
    assert s["output.weight"] == G.Q6_K and s["token_embd.weight"] == G.Q4_K
    assert s["blk.0.attn_v.weight"] == G.Q5_K and s["blk.0.ffn_down.weight"] == G.Q5_K
    assert s["blk.5.ffn_down.weight"] == G.Q4_K
    assert set(plan(FileType.Q8_0).values()) == {G.Q8_0}
    assert set(plan(FileType.Q4_K_M, pure=True).values()) == {G.Q4_K}
    assert plan(FileType.Q6_K, leave_output=True)["output.weight"] == G.F32
    # 100 columns fit no block at all: F16, as llama.cpp does
    assert TypePlanner(MixOptions(FileType.Q4_K_M), 2, False).choose("blk.0.attn_q.weight", (64, 100)) == G.F16


def test_export_errors_and_atomicity(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    with pytest.raises(ConfigError, match="Q4_K_M"):
        export_gguf(model, tok, tmp_path / "x.gguf", "Q7_X")
    with pytest.raises(InputError, match="tokenizer"):
        export_gguf(model, None, tmp_path / "x.gguf", "Q8_0")
    out = tmp_path / "keep.gguf"
    out.write_bytes(b"old")
    import torchcompress.formats.gguf_write as gw

    def boom(*a, **k):
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(gw, "quantize", boom)
    with pytest.raises(RuntimeError):
        export_gguf(model, tok, out, "Q8_0")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.gguf"]
