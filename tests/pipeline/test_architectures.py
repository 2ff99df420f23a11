"""The block pipeline finds the decoder blocks of each supported family and streams them with the
same result as the in-memory path (tiny random configs, offline)."""

import copy

import pytest
import torch

from torchcompress.formats.checkpoint import load_compressed, save_compressed
from torchcompress.recipe.runner import compress
from torchcompress.recipe.schema import load_recipe
from torchcompress.recipe.streaming import compress_checkpoint

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _config(family):
    import transformers as t

    if family == "mistral":
        return t.MistralConfig(**COMMON, sliding_window=16)
    if family == "qwen2":
        return t.Qwen2Config(**COMMON)
    if family == "qwen3":
        return t.Qwen3Config(**COMMON, head_dim=16)
    if family == "gemma2":
        return t.Gemma2Config(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    if family == "gemma3":
        return t.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    if family == "phi3":
        return t.Phi3Config(**COMMON, pad_token_id=0)
    raise AssertionError(family)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
@pytest.mark.parametrize("recipe", ["w4-rtn", "w4-gptq-g128"])
def test_family_streams_like_in_memory(family, recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    from torchcompress.calibration.data import CalibrationSet

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family)).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 256, (8, 32), generator=g)  # windows longer than the sliding windows above
    calib = CalibrationSet(ids, torch.ones_like(ids))
    r = load_recipe(recipe)
    mem = copy.deepcopy(model)
    compress(mem, r, calib)
    save_compressed(mem, tmp_path / "mem")
    compress_checkpoint(src, r, tmp_path / "stream", calib=calib)
    a, b = load_compressed(tmp_path / "mem"), load_compressed(tmp_path / "stream")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma2", "gemma3", "phi3"])
def test_streamed_forward_equals_the_model_forward(family, tmp_path):
    """Block by block with the captured per-block arguments (Gemma's sliding and global layers get
    different masks) gives the whole model's own logits: perplexity equal to float precision."""
    from transformers import AutoModelForCausalLM

    from torchcompress.eval.perplexity import TextWindows, evaluate
    from torchcompress.eval.streaming import evaluate_streaming

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family)).eval()
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(1, 256, (4, 32), generator=torch.Generator().manual_seed(2))  # 32 > sliding windows 8/16
    win = TextWindows(ids, "random")
    whole = evaluate(model, win)
    streamed = evaluate_streaming(tmp_path / "src", win, batch_size=2)
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-5)


def test_capture_restores_an_instance_forward():
    """A block whose forward is an instance attribute (accelerate's dispatch hooks put one there) gets it back."""
    from tests.tiny import tiny_config
    from transformers import LlamaForCausalLM

    from torchcompress.pipeline.context import capture_inputs

    model = LlamaForCausalLM(tiny_config()).eval()
    block = model.model.layers[1]
    wrapped = block.forward  # a bound method, stored on the instance as a wrapper would be
    block.forward = wrapped
    ids = torch.randint(0, 256, (2, 8))
    got = capture_inputs(model, model.model.layers, [(ids, torch.ones_like(ids))], "cpu")
    assert len(got) == 1 and block.__dict__["forward"] is wrapped
    assert "forward" not in model.model.layers[0].__dict__
