"""SmoothQuant: the factor formula, one decoder block unchanged in float (grouped and plain attention),
outliers actually migrated, the stage on a whole model, refusals."""

import copy

import pytest
import torch
import torch.nn as nn

from torchcompress.errors import ConfigError, NumericError
from torchcompress.primitives.smoothquant import smoothing_scales, weight_absmax
from torchcompress.quant.smoothquant import STAT_NAMES, smooth_block

pytest.importorskip("transformers")


def test_factor_formula():
    a = torch.tensor([4.0, 0.0, 9.0, 1e-9])
    w = torch.tensor([1.0, 2.0, 0.0, 4.0])
    s = smoothing_scales(a, w, 0.5)
    assert s.tolist() == pytest.approx([2.0, 1.0, 1.0, (1e-5) ** 0.5 / 2.0])  # dead channels: 1; floor 1e-5
    assert torch.equal(smoothing_scales(a[:1], w[:1], 0.0), 1 / w[:1])
    assert torch.equal(smoothing_scales(a[:1], w[:1], 1.0), a[:1])
    assert torch.equal(weight_absmax(torch.tensor([[1.0, -5.0]]), torch.tensor([[-3.0, 2.0]])), torch.tensor([3.0, 5.0]))
    with pytest.raises(ConfigError, match="alpha"):
        smoothing_scales(a, w, 1.5)
    with pytest.raises(NumericError, match="q_proj"):
        smoothing_scales(torch.tensor([float("nan")]), w[:1], 0.5, "q_proj")


def _block_and_inputs(kv_heads: int):
    from transformers import LlamaForCausalLM

    from tests.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(num_key_value_heads=kv_heads)
    model = LlamaForCausalLM(cfg).eval()
    block = model.model.layers[0]
    with torch.no_grad():  # make the norms and activations non-trivial: outlier channels
        block.input_layernorm.weight.copy_(torch.rand(cfg.hidden_size) * 2 + 0.1)
        block.input_layernorm.weight[:3] *= 30
        block.post_attention_layernorm.weight.copy_(torch.rand(cfg.hidden_size) + 0.5)
    x = torch.randn(2, 12, cfg.hidden_size)
    pos = torch.arange(12)[None].expand(2, -1)
    emb = model.model.rotary_emb(x, pos)
    return model, block, x, emb


def _run(block, x, emb):
    out = block(x, position_embeddings=emb, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def _stats(block, x, emb) -> dict:
    stats, hs = {}, []
    for n in STAT_NAMES:
        m = block.get_submodule(n)
        hs.append(m.register_forward_hook(lambda _m, a, _o, n=n: stats.__setitem__(n, a[0].abs().flatten(0, -2).amax(0))))
    _run(block, x, emb)
    for h in hs:
        h.remove()
    return stats


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query (2 kv heads for 4 query heads) and plain
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_block_function_unchanged_in_float_and_outliers_migrate(kv_heads, alpha):
    _, block, x, emb = _block_and_inputs(kv_heads)
    with torch.no_grad():
        before = _run(block, x, emb)
        stats = _stats(block, x, emb)
        ref = copy.deepcopy(block)
        used = smooth_block(block, stats, alpha)
        after = _run(block, x, emb)
    assert set(used) == {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"}
    # fp32 reassociation only: measured max |diff| 4e-7 to 8.3e-7 on outputs up to 3.8
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):  # the weights did change
        assert not torch.equal(block.get_submodule(n).weight, ref.get_submodule(n).weight), n
    new = _stats(block, x, emb)
    spread = lambda a: float(a.detach().max() / a.detach().median())  # noqa: E731
    assert spread(new["self_attn.q_proj"]) < spread(stats["self_attn.q_proj"]) / 3  # the outlier channels moved


def test_missing_statistics_skip_their_migration_and_none_is_an_error():
    _, block, x, emb = _block_and_inputs(2)
    with torch.no_grad():
        stats = _stats(block, x, emb)
        o_before = block.self_attn.o_proj.weight.clone()
        used = smooth_block(block, {"mlp.down_proj": stats["mlp.down_proj"]}, 0.5)
    assert list(used) == ["mlp.up_proj"] and torch.equal(block.self_attn.o_proj.weight, o_before)
    with pytest.raises(ConfigError, match="no statistic"):
        smooth_block(block, {}, 0.5)


class _OnePlusNorm(nn.Module):  # Gemma-style: (1 + weight) * x; dividing weight by s does not divide the output
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * (1 + self.weight)


def test_a_norm_that_does_not_scale_with_its_weight_is_refused_and_left_intact():
    _, block, x, emb = _block_and_inputs(2)
    block.input_layernorm = _OnePlusNorm(x.shape[-1])
    with torch.no_grad():
        stats = _stats(block, x, emb)
        q_before = block.self_attn.q_proj.weight.clone()
        with pytest.raises(ConfigError, match="does not scale with its weight"):
            smooth_block(block, stats, 0.5)
    assert torch.equal(block.input_layernorm.weight, torch.zeros(x.shape[-1]))
    assert torch.equal(block.self_attn.q_proj.weight, q_before)


def test_stage_on_a_whole_model_keeps_its_logits():
    from tests.tiny import calibrated_tiny_llama
    from torchcompress.quant.smoothquant import smoothquant_model

    model, _tok, calib = calibrated_tiny_llama()
    ids = calib.input_ids[:2]
    with torch.no_grad():
        before = model(ids).logits
        smoothed = copy.deepcopy(model)
        assert smoothquant_model(smoothed, 0.5, calib) == ["model.layers.0", "model.layers.1"]
        after = smoothed(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # measured max |diff| 6e-7 on logits up to 1.7
    assert not torch.equal(smoothed.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    with pytest.raises(ConfigError, match="calibration data"):
        smoothquant_model(copy.deepcopy(model), 0.5, None)
