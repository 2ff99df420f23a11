"""`torchcompress export --format gguf` and the `gguf` recipe stage, on the tiny saved Llama."""

from __future__ import annotations

import pytest
import torch

from torchcompress.cli import main

gguf = pytest.importorskip("gguf")


def test_export_q8_0_reads_back(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from torchcompress.formats.gguf_load import load_gguf_model

    out = tmp_path / "tiny.Q8_0.gguf"
    assert main(["export", "--model", str(tiny_llama_dir), "--format", "gguf", "--qtype", "Q8_0", "--out", str(out)]) == 0
    assert "Q8_0" in capsys.readouterr().out
    r = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 200 fit no 32-block: llama.cpp's F16 fallback
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    back = load_gguf_model(out)
    ids = torch.randint(0, ref.config.vocab_size, (1, 16))
    with torch.no_grad():
        a, b = ref(ids).logits, back(ids).logits
    assert (a - b).norm() / a.norm() < 0.02  # measured ~0.004 for Q8_0 on this model


@pytest.mark.parametrize("argv,code", [
    (["--qtype", "Q9_K"], 2),
    (["--out", "x.bin"], 2),
])
def test_export_bad_input(tiny_llama_dir, tmp_path, argv, code, capsys):
    base = {"--model": str(tiny_llama_dir), "--format": "gguf", "--qtype": "Q8_0", "--out": str(tmp_path / "o.gguf")}
    base.update(dict(zip(argv[::2], argv[1::2])))
    args = ["export"] + [x for kv in base.items() for x in kv]
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]


def test_gguf_recipe_stage_and_checkpoint_roundtrip(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from torchcompress.formats.checkpoint import load_compressed, save_compressed
    from torchcompress.nn.gguf_linear import GGUFLinear
    from torchcompress.primitives.gguf_common import GGMLType as G
    from torchcompress.recipe import compress, load_recipe

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    report = compress(model, load_recipe("gguf-q4_k_m"))
    layers = {r.module: r for r in report.layers}
    # hidden 96 is no multiple of 256: Q4_K -> Q5_0; ffn_down rows of 200 fit no block and stay float
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, GGUFLinear) and q.qtype == G.Q5_0
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[1].self_attn.v_proj, GGUFLinear)
    assert model.model.layers[1].self_attn.v_proj.qtype == G.Q8_0  # Q6_K on a "more bits" layer -> Q8_0
    assert all(r.sqnr_db > 15 for r in layers.values())
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        before = model(ids).logits
    save_compressed(model, tmp_path / "c", None)
    back = load_compressed(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, before)
    assert main(["recipe", "check", "gguf-q8_0"]) == 0
