"""Recipe stages ``lora`` and ``svd`` and the bundled low-rank recipes."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_config
from torchcompress import QuantLinear, RecipeError
from torchcompress.lowrank import LoRAConfig, SVDConfig
from torchcompress.nn.lora_linear import LoRALinear
from torchcompress.nn.lowrank_linear import LowRankLinear
from torchcompress.recipe import compress, load_recipe, parse_recipe

pytestmark = pytest.mark.hf


def _model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(hidden_size=128, intermediate_size=256)).eval()


def test_bundled_recipes_parse():
    svd = load_recipe("svd-mlp-50").stages[0]
    assert svd.kind == "svd" and svd.config == SVDConfig(param_ratio=0.5, activation_aware=True)
    assert svd.config.needs_calibration
    q = load_recipe("qlora-w4")
    assert [s.kind for s in q.stages] == ["rtn", "lora"] and q.stages[1].config.r == 16


def test_qlora_recipe_runs_and_records():
    m = _model()
    report = compress(m, load_recipe("qlora-w4"))
    loras = [mod for mod in m.modules() if isinstance(mod, LoRALinear)]
    assert len(loras) == 14 and all(isinstance(x.base_layer, QuantLinear) for x in loras)
    recs = [r for r in report.layers if r.kind == "lora"]
    assert len(recs) == 14
    for r in recs:  # params = the adapter's r * (K + N); bytes grow by exactly the adapter's float32 tensors
        mod = m.get_submodule(r.module)
        assert r.params == 16 * (mod.in_features + mod.out_features)
        assert r.bytes_after - r.bytes_before == 4 * r.params
    assert {s.modules for s in report.stages} == {14}


def test_svd_stage_plain_and_records():
    m = _model()
    recipe = parse_recipe("""
stages:
  - kind: svd
    name: mlp
    rank: 16
    targets: ["re:.*mlp\\\\..*"]
""")
    report = compress(m, recipe)
    assert sum(isinstance(x, LowRankLinear) for x in m.modules()) == 6
    for r in report.layers:
        assert r.bytes_after < r.bytes_before and r.sqnr_db > 0
        assert r.bits_per_weight == pytest.approx(16 * (128 + 256) * 32 / (128 * 256))


def test_lora_stage_without_targets_uses_config_default():
    m = _model()
    compress(m, parse_recipe("stages:\n  - kind: lora\n    r: 4\n"))
    names = sorted(n for n, x in m.named_modules() if isinstance(x, LoRALinear))
    assert names == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))


@pytest.mark.parametrize("body,match", [
    ("kind: svd\n    rank: 4\n    energy: 0.5", "exactly one"),
    ("kind: lora\n    r: 0", "r"),
    ("kind: lora\n    init: pissa", "init"),
    ("kind: svd\n    rank: 4\n    rnak: 3", "unknown key"),
])
def test_bad_stages_name_the_line(body, match):
    with pytest.raises(RecipeError, match=match) as e:
        parse_recipe(f"stages:\n  - {body}\n", "r.yaml")
    assert "r.yaml:" in str(e.value)


def test_svd_stage_config_type():
    assert isinstance(parse_recipe("stages:\n  - kind: lora\n").stages[0].config, LoRAConfig)
