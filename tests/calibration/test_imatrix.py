"""imatrix: per-column mean squared activations (checked against a hand-computed layer input), saved and
loaded, and used by the GGUF export for exactly the tensors whose type has a weighted quantizer."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import make_tokenizer, tiny_config
from torchcompress.calibration.data import CalibrationSet
from torchcompress.calibration.imatrix import (
    compute_imatrix,
    imatrix_from_spec,
    load_imatrix,
    save_imatrix,
)
from torchcompress.errors import InputError
from torchcompress.primitives import gguf_blocks
from torchcompress.primitives.gguf_blocks import IMATRIX_TYPES


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer(300)
    cfg = tiny_config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), tok


def _calib(vocab: int) -> CalibrationSet:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padding must not count
    return CalibrationSet(ids, mask)


def test_imatrix_is_mean_squared_layer_input(tiny):
    model, _ = tiny
    calib = _calib(model.config.vocab_size)
    imat = compute_imatrix(model, calib, batch_size=2)
    assert set(imat) >= {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert "lm_head" not in imat and "lm_head" in compute_imatrix(model, calib, process_output=True)
    with torch.no_grad():  # layer 0's attention input, computed by hand: RMSNorm(embeddings) on real tokens
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(calib.input_ids))[calib.attention_mask.bool()]
    expect = (x.double() ** 2).mean(0).float()
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(imat[f"model.layers.0.self_attn.{name}"], expect, rtol=1e-5, atol=0)
    assert imat["model.layers.0.mlp.down_proj"].shape == (512,)
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in imat.values())


def test_save_load_roundtrip_and_errors(tiny, tmp_path):
    model, tok = tiny
    imat = compute_imatrix(model, _calib(model.config.vocab_size))
    p = save_imatrix(imat, tmp_path / "m.imatrix.safetensors")
    back = imatrix_from_spec(str(p), model, tok)
    assert set(back) == set(imat) and all(torch.equal(back[k], imat[k]) for k in imat)
    with pytest.raises(InputError, match="no such file"):
        load_imatrix(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="not a readable"):
        load_imatrix(tmp_path / "bad.safetensors")
    save_imatrix({"a": -torch.ones(4)}, tmp_path / "neg.safetensors")
    with pytest.raises(InputError, match="non-negative"):
        load_imatrix(tmp_path / "neg.safetensors")


def test_export_uses_imatrix_for_weighted_types_only(tiny, tmp_path):
    from torchcompress.formats.gguf_read import read_gguf
    from torchcompress.formats.gguf_write import export_gguf

    model, tok = tiny
    imat = compute_imatrix(model, _calib(model.config.vocab_size))
    a = export_gguf(model, tok, tmp_path / "plain.gguf", "Q4_K_M")
    b = export_gguf(model, tok, tmp_path / "imat.gguf", "Q4_K_M", importance=imat)
    assert a.types == b.types
    ga, gb = read_gguf(a.path), read_gguf(b.path)
    changed = {n for n in ga.tensors if not torch.equal(ga.tensor_bytes(n), gb.tensor_bytes(n))}
    kq = {n for n, t in b.types.items() if t in IMATRIX_TYPES and n not in ("token_embd.weight", "output.weight")}
    assert changed == kq and kq
    # and each changed tensor is exactly quantize(..., importance=its column importance)
    w = model.model.layers[1].mlp.down_proj.weight
    want = gguf_blocks.quantize(w, b.types["blk.1.ffn_down.weight"], importance=imat["model.layers.1.mlp.down_proj"])
    assert torch.equal(gb.tensor_bytes("blk.1.ffn_down.weight").reshape(want.shape), want)


def test_gguf_stage_with_imatrix(tiny):
    import copy

    from torchcompress.errors import ConfigError
    from torchcompress.nn.gguf_linear import GGUFLinear
    from torchcompress.quant.gguf import quantize_gguf_
    from torchcompress.quant.gguf_config import GGUFConfig

    model, _ = tiny
    calib = _calib(model.config.vocab_size)
    cfg = GGUFConfig(qtype="Q4_K_M", imatrix=True)
    assert cfg.needs_calibration and not GGUFConfig().needs_calibration
    with pytest.raises(ConfigError, match="imatrix"):
        GGUFConfig(imatrix="yes")
    with pytest.raises(ConfigError, match="calibration data"):
        quantize_gguf_(copy.deepcopy(model), cfg)
    imat = compute_imatrix(model, calib, process_output=True)
    q = quantize_gguf_(copy.deepcopy(model), cfg, calib=calib)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        mod, lin = q.get_submodule(name), model.get_submodule(name)
        assert isinstance(mod, GGUFLinear)
        want = gguf_blocks.quantize(lin.weight, mod.qtype, importance=imat[name])
        assert torch.equal(mod.blocks, want), name
        assert not torch.equal(mod.blocks, gguf_blocks.quantize(lin.weight, mod.qtype)), name
