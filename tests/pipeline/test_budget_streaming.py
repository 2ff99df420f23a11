"""The budget stage on the streamed block pipeline (a float pre-pass for the sensitivity, then the
main pass) equals the in-memory path tensor for tensor, for RTN, GPTQ and GGUF plans."""

import pytest

from torchcompress.formats.checkpoint import load_compressed
from torchcompress.recipe.schema import parse_recipe
from torchcompress.recipe.streaming import compress_checkpoint

from .test_streaming import _assert_same, _in_memory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny import calibrated_tiny_llama

    model, tok, calib = calibrated_tiny_llama(hidden_size=128, intermediate_size=256, samples=8, seq_len=32)
    src = tmp_path_factory.mktemp("src") / "model"
    model.save_pretrained(src, max_shard_size="150KB")
    tok.save_pretrained(src)
    return model, tok, calib, src


@pytest.mark.parametrize("method,bpw", [("rtn", 4.5), ("gptq", 3.5), ("gguf", 5.0)])
def test_streamed_budget_equals_in_memory(tiny, tmp_path, monkeypatch, method, bpw):
    monkeypatch.setenv("TORCHCOMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    model, tok, calib, src = tiny
    recipe = parse_recipe(f"name: b\nstages:\n  - kind: budget\n    method: {method}\n    target_bpw: {bpw}\n"
                          "    ignore: [lm_head]\n")
    ref, ref_rep = _in_memory(model, recipe, calib, tmp_path / "mem")
    rep = compress_checkpoint(src, recipe, tmp_path / "stream", calib=calib, tokenizer=tok)
    _assert_same(ref, load_compressed(tmp_path / "stream"))
    mem = {r.module: r.choice for r in ref_rep.layers}
    got = {r.module: r.choice for r in rep.layers}
    assert got == mem and len(set(got.values())) > 1 and None not in got.values()
    assert rep.stages[0].kind == "budget" and rep.stages[0].modules == len(got) == 14
