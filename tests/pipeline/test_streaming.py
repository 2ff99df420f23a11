"""The block pipeline over a checkpoint on disk equals the in-memory path, tensor for tensor."""

import copy

import pytest
import torch

from torchcompress.formats.checkpoint import load_compressed, save_compressed
from torchcompress.recipe.runner import compress
from torchcompress.recipe.schema import load_recipe
from torchcompress.recipe.streaming import compress_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny import calibrated_tiny_llama

    model, tok, calib = calibrated_tiny_llama(hidden_size=128, intermediate_size=192, samples=8, seq_len=32)
    src = tmp_path_factory.mktemp("src") / "model"
    model.save_pretrained(src, max_shard_size="150KB")  # several shards + an index, as big checkpoints come
    tok.save_pretrained(src)
    return model, tok, calib, src


def _in_memory(model, recipe, calib, out):
    m = copy.deepcopy(model)
    rep = compress(m, recipe, calib)
    save_compressed(m, out)
    return load_compressed(out), rep


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", ["w4-rtn", "w4-gptq-g128", "wanda-50", "sparsegpt-2of4", "svd-mlp-50", "gguf-q4_k_m",
                                  "w4-hqq-g64", "w4-rotate-gptq-g128", "w4-awq-g128"])
def test_streamed_equals_in_memory(tiny, tmp_path, name):
    model, tok, calib, src = tiny
    recipe = load_recipe(name)
    ref, ref_rep = _in_memory(model, recipe, calib, tmp_path / "mem")
    rep = compress_checkpoint(src, recipe, tmp_path / "stream", calib=calib, tokenizer=tok)
    got = load_compressed(tmp_path / "stream")
    _assert_same(ref, got)
    # the report: same modules changed, same sizes by module type
    assert sorted(r.module for r in rep.layers) == sorted(r.module for r in ref_rep.layers)
    assert rep.bytes_by_type_after == ref_rep.bytes_by_type_after
    assert rep.bytes_by_type_before == ref_rep.bytes_by_type_before
    assert len(rep.layers) > 0 and rep.size_bytes_after > 0
    assert (tmp_path / "stream" / "model.safetensors").is_file()  # small: one file, as save_pretrained writes
    assert not (tmp_path / "stream.partial").exists()


def test_big_outputs_stay_sharded_and_load_everywhere(tiny, tmp_path, monkeypatch):
    """Above the single-file size the shards and their index are the output; our loader and
    transformers (with the plugin) read it, and the tensors equal the merged single file's."""
    from torchcompress.pipeline import writer

    model, tok, calib, src = tiny
    recipe = load_recipe("w4-rtn")
    compress_checkpoint(src, recipe, tmp_path / "one", tokenizer=tok)
    monkeypatch.setattr(writer, "SINGLE_FILE_BYTES", 0)
    compress_checkpoint(src, recipe, tmp_path / "sharded", tokenizer=tok)
    d = tmp_path / "sharded"
    n_blocks = model.config.num_hidden_layers
    assert (d / "model.safetensors.index.json").is_file() and not (d / "model.safetensors").exists()
    assert len(list(d.glob("model-*-of-*.safetensors"))) >= n_blocks  # one shard per block at least
    _assert_same(load_compressed(tmp_path / "one"), load_compressed(d))
    import torchcompress.hf  # noqa: F401  registers the quantization method
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(d))
    ids = calib.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_compressed(d)(ids).logits, rtol=0, atol=0)


def test_streamed_equals_in_memory_autoround(tiny, tmp_path):
    """The bundled sign-gradient rounding recipe, with fewer steps (the test's time) and 4 of the 8
    samples of a batch per step (the seeded draw must match too)."""
    import dataclasses

    model, tok, calib, src = tiny
    recipe = load_recipe("w4-autoround-g128")
    stage = recipe.stages[0]
    stage = dataclasses.replace(stage, config=dataclasses.replace(stage.config, iters=12, batch_size=4))
    recipe = dataclasses.replace(recipe, stages=(stage,))
    ref, ref_rep = _in_memory(model, recipe, calib, tmp_path / "mem")
    rep = compress_checkpoint(src, recipe, tmp_path / "stream", calib=calib, tokenizer=tok)
    _assert_same(ref, load_compressed(tmp_path / "stream"))
    assert sorted(r.module for r in rep.layers) == sorted(r.module for r in ref_rep.layers)
    assert len(rep.layers) == 14
