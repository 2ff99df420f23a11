import copy

import pytest
import torch

from torchcompress.api import prune_
from torchcompress.errors import ConfigError
from torchcompress.formats.checkpoint import load_compressed, save_compressed
from torchcompress.nn.pruned_linear import PrunedLinear
from torchcompress.prune import StructuredPruneConfig
from torchcompress.prune.activation import adaptive_counts


def _pair(tiny, **kw):
    model, tok, calib = tiny
    phys, masked = copy.deepcopy(model), copy.deepcopy(model)
    prune_(phys, StructuredPruneConfig(**kw), calib_data=calib)
    prune_(masked, StructuredPruneConfig(physical=False, **kw), calib_data=calib)
    return phys, masked, calib.input_ids[:3], calib.attention_mask[:3]


@pytest.mark.parametrize("importance", ["l1", "l2", "activation"])
def test_physical_equals_masked(tiny, importance):
    phys, masked, ids, mask = _pair(tiny, mlp_ratio=0.25, head_ratio=0.5, importance=importance)
    for layer in phys.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (150, 96) and layer.mlp.down_proj.weight.shape == (96, 150)
        assert layer.self_attn.q_proj.weight.shape == (48, 96) and layer.self_attn.k_proj.weight.shape == (24, 96)
        assert layer.self_attn.o_proj.weight.shape == (96, 48)
    assert phys.config.intermediate_size == 150
    assert (phys.config.num_attention_heads, phys.config.num_key_value_heads, phys.config.head_dim) == (2, 1, 24)
    want = masked(input_ids=ids, attention_mask=mask).logits
    got = phys(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert isinstance(masked.model.layers[0].mlp.up_proj, PrunedLinear)
    assert masked.model.layers[0].mlp.up_proj.sparsity() == pytest.approx(0.25)


def test_smaller_model_saves_reloads_and_runs(tiny, tmp_path):
    model, tok, _ = tiny
    phys, _, ids, mask = _pair(tiny, mlp_ratio=0.25, head_ratio=0.5)
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in phys.parameters())
    assert n1 < n0
    save_compressed(phys, tmp_path / "small", tok)
    back = load_compressed(tmp_path / "small")
    assert sum(p.numel() for p in back.parameters()) == n1
    assert torch.equal(back(input_ids=ids, attention_mask=mask).logits, phys(input_ids=ids, attention_mask=mask).logits)
    from transformers import AutoModelForCausalLM

    plain = tmp_path / "hf"
    phys.save_pretrained(plain)
    hf = AutoModelForCausalLM.from_pretrained(plain).eval()
    torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, phys(input_ids=ids, attention_mask=mask).logits)


def test_keeps_most_important_channels(tiny):
    model, _, calib = tiny
    m = copy.deepcopy(model)
    down = m.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight[:, 7] *= 1000.0  # channel 7 matters most by every measure
        m.model.layers[0].mlp.up_proj.weight[11] = 0.0  # channel 11 cannot matter (up row zero)
        m.model.layers[0].mlp.gate_proj.weight[11] = 0.0
        down.weight[:, 11] = 0.0
    ref = copy.deepcopy(m)
    prune_(m, StructuredPruneConfig(mlp_ratio=0.5, importance="activation"), calib_data=calib)
    kept = m.model.layers[0].mlp.down_proj.weight
    col7 = ref.model.layers[0].mlp.down_proj.weight[:, 7]
    assert any(torch.equal(kept[:, j], col7) for j in range(kept.shape[1]))
    assert not any(torch.equal(kept[:, j], torch.zeros_like(col7)) for j in range(kept.shape[1]))


def test_adaptive_budget(tiny):
    model, _, calib = tiny
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[:, :100] *= 1e-3  # half of layer 1's channels barely matter
    prune_(m, StructuredPruneConfig(mlp_ratio=0.25, importance="activation", allocation="adaptive", max_layer_ratio=0.6),
           calib_data=calib)
    def dropped(layer):
        down = layer.mlp.down_proj
        return int((~down.mask.all(0)).sum()) if isinstance(down, PrunedLinear) else 0

    d0, d1 = (dropped(layer) for layer in m.model.layers)
    assert d0 + d1 == 100  # 25% of 2 x 200 channels
    assert d1 == 100 and d0 == 0  # the weak half of layer 1 goes first
    out = m(input_ids=calib.input_ids[:2]).logits
    assert torch.isfinite(out).all()
    m2 = copy.deepcopy(model)
    with torch.no_grad():
        m2.model.layers[1].mlp.down_proj.weight[:, :180] *= 1e-3
    prune_(m2, StructuredPruneConfig(mlp_ratio=0.4, importance="activation", allocation="adaptive", max_layer_ratio=0.6),
           calib_data=calib)
    assert [dropped(layer) for layer in m2.model.layers] == [40, 120]  # layer 1 capped at 60%
    for layer in m2.model.layers:  # gate/up rows and down columns agree
        cols = ~layer.mlp.down_proj.mask.all(0)
        assert torch.equal(cols, ~layer.mlp.up_proj.mask.all(1))


def test_adaptive_counts_cap():
    s = [torch.ones(10), torch.ones(10) * 1e-9]
    assert adaptive_counts(s, 0.5, 0.9) == [9, 1]  # equal after normalization: by position, capped at 9
    assert sum(adaptive_counts([torch.rand(7), torch.rand(5)], 0.3, 0.5)) == round(0.3 * 12)


def test_structured_errors(tiny):
    model, _, calib = tiny
    with pytest.raises(ConfigError, match="adaptive"):
        StructuredPruneConfig(allocation="adaptive")
    with pytest.raises(ConfigError, match="calib_data"):
        prune_(copy.deepcopy(model), StructuredPruneConfig(importance="activation"))
    with pytest.raises(ConfigError, match="select all blocks"):
        prune_(copy.deepcopy(model), StructuredPruneConfig(0.25), targets=["re:.*layers\\.0\\..*"])
    with pytest.raises(ConfigError, match="all 2 key/value"):
        prune_(copy.deepcopy(model), StructuredPruneConfig(0.0, head_ratio=0.9))
