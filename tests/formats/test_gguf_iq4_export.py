"""GGUF export with llama.cpp's IQ4_NL / IQ4_XS file types: llama.cpp's type choices for them, the
file read back by gguf-py, and gguf-py's dequantization of every tensor equal to ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import make_tokenizer, tiny_config
from torchcompress.formats.gguf_mix import FileType, MixOptions, TypePlanner, parse_file_type
from torchcompress.formats.gguf_write import export_gguf, permute_rope
from torchcompress.primitives.gguf_blocks import dequantize, quantize
from torchcompress.primitives.gguf_common import GGMLType as G

gguf = pytest.importorskip("gguf")


def test_mix_rules_iq4():
    shapes = {"output.weight": (1000, 512), "token_embd.weight": (1000, 512), "blk.0.attn_v.weight": (128, 512),
              "blk.0.attn_q.weight": (512, 512), "blk.0.ffn_down.weight": (512, 1024),
              "blk.5.ffn_down.weight": (512, 1024), "blk.3.attn_q.weight": (512, 576)}

    def plan(ft, **kw):
        p = TypePlanner(MixOptions(ft, **kw), n_layer=16, tied=False)
        return {n: p.choose(n, s) for n, s in shapes.items()}

    for ft, t in ((FileType.IQ4_XS, G.IQ4_XS), (FileType.IQ4_NL, G.IQ4_NL)):
        s = plan(ft)
        assert s["output.weight"] == G.Q6_K and s["token_embd.weight"] == t and s["blk.0.attn_q.weight"] == t
        assert s["blk.0.ffn_down.weight"] == G.Q5_K  # first n/8 layers without an imatrix
        assert s["blk.5.ffn_down.weight"] == t and s["blk.0.attn_v.weight"] == t
        assert plan(ft, has_imatrix=True)["blk.0.ffn_down.weight"] == t
        assert plan(ft, n_gqa=4)["blk.0.attn_v.weight"] == G.Q5_K
    # 576 columns: IQ4_XS (256-blocks) falls back to IQ4_NL, as llama.cpp's tensor_type_fallback does
    assert plan(FileType.IQ4_XS)["blk.3.attn_q.weight"] == G.IQ4_NL
    assert parse_file_type("iq4_xs") is FileType.IQ4_XS and int(FileType.IQ4_NL) == 25 and int(FileType.IQ4_XS) == 30


@pytest.mark.parametrize("qtype", ["IQ4_XS", "IQ4_NL"])
def test_export_reads_back_with_gguf_py(tmp_path, qtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer(300)
    cfg = tiny_config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path / f"m.{qtype}.gguf"
    res = export_gguf(model, tok, out, qtype)
    r = gguf.GGUFReader(str(out))
    assert int(r.fields["general.file_type"].parts[-1][0]) == int(FileType[qtype])
    tensors = {t.name: t for t in r.tensors}
    want = G[qtype]
    assert sum(1 for t in res.types.values() if t == want) >= 6
    sd = model.state_dict()
    hf = {"blk.1.attn_q.weight": ("model.layers.1.self_attn.q_proj.weight", cfg.num_attention_heads),
          "blk.1.ffn_up.weight": ("model.layers.1.mlp.up_proj.weight", None)}
    for name, t in tensors.items():
        tt = G(int(t.tensor_type))
        assert tt == res.types[name]
        if tt in (G.IQ4_NL, G.IQ4_XS):
            data = np.asarray(t.data)
            shape = tuple(int(s) for s in reversed(t.shape))
            theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(int(tt))).reshape(shape)
            ours = dequantize(torch.from_numpy(data.copy()), tt, shape).numpy()
            np.testing.assert_array_equal(ours, theirs, err_msg=name)
        if name in hf:
            src, heads = hf[name]
            w = sd[src] if heads is None else permute_rope(sd[src], heads)
            assert np.array_equal(np.asarray(t.data).reshape(-1), quantize(w, tt).numpy().reshape(-1)), name
