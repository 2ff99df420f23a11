"""Routers and the shared-expert gate of a mixture-of-experts layer stay float under every default
(llm-compressor's and vLLM's convention): in-memory ``quantize_``, the recipe runner and the streamed
pipeline, even with a recipe whose ``ignore`` is ``[lm_head]`` alone."""

import copy

import pytest
import torch
import torch.nn as nn

from torchcompress.api import quantize_
from torchcompress.config import QuantScheme
from torchcompress.formats.checkpoint import load_compressed, read_manifest
from torchcompress.nn.quant_linear import QuantLinear
from torchcompress.recipe.runner import compress
from torchcompress.recipe.schema import load_recipe
from torchcompress.recipe.streaming import compress_checkpoint
from tests.pipeline.test_moe import _calib, _model


def _float_parts(model):
    """Every router / shared-expert gate weight of the Qwen2-MoE model, cloned."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        out[f"model.layers.{i}.mlp.gate"] = layer.mlp.gate.weight.detach().clone()
        out[f"model.layers.{i}.mlp.shared_expert_gate"] = layer.mlp.shared_expert_gate.weight.detach().clone()
    return out


def _assert_float(model, want):
    for name, w in want.items():
        m = model.get_submodule(name)
        if name.endswith("shared_expert_gate"):
            assert type(m) is nn.Linear, (name, type(m))
        assert torch.equal(m.weight, w), name


@pytest.mark.parametrize("path", ["quantize_", "recipe", "stream", "gptq-recipe", "gptq-stream"])
def test_qwen2_moe_router_and_shared_expert_gate_stay_float(path, tmp_path):
    model = _model("qwen2_moe")
    want = _float_parts(model)
    recipe = load_recipe("w4-gptq-g128" if path.startswith("gptq") else "w4-rtn")
    assert recipe.stages[0].ignore in (None, ("lm_head",), ["lm_head"])  # no router named: the default decides
    if path == "quantize_":
        quantize_(model, QuantScheme(bits=4, group_size=32))
        out = model
    elif path in ("recipe", "gptq-recipe"):
        compress(model, recipe, _calib())
        out = model
    else:
        model.save_pretrained(tmp_path / "src")
        compress_checkpoint(tmp_path / "src", recipe, tmp_path / "out", calib=_calib())
        modules = read_manifest(tmp_path / "out")["modules"]
        assert not any(n.endswith(("shared_expert_gate", "mlp.gate")) for n in modules)
        out = load_compressed(tmp_path / "out")
    _assert_float(out, want)
    # the rest was quantized (the test would pass vacuously on a no-op)
    assert isinstance(out.model.layers[0].mlp.shared_expert.down_proj, QuantLinear)


def test_explicit_ignore_list_of_lm_head_still_spares_the_shared_expert_gate():
    model = _model("qwen2_moe")
    want = _float_parts(model)
    quantize_(model, QuantScheme(bits=4, group_size=32), ignore=["lm_head"])
    _assert_float(model, want)


class _LinearRouterMoE(nn.Module):
    """A MoE layer of the older layout (transformers 4 Mixtral): the router is a plain ``nn.Linear``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(64, 4, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64)) for _ in range(4))


def test_linear_router_is_skipped_by_type_targets_and_taken_by_name():
    from torchcompress.targets import router_like, select_modules

    torch.manual_seed(0)
    model = nn.Sequential(_LinearRouterMoE())
    assert router_like(model) == {id(model[0].gate)}
    w = model[0].gate.weight.detach().clone()
    q = copy.deepcopy(model)
    quantize_(q, QuantScheme(bits=4, group_size=32))
    assert type(q[0].gate) is nn.Linear and torch.equal(q[0].gate.weight, w)
    assert isinstance(q[0].experts[0][0], QuantLinear)
    # a name target is an explicit request: it selects the router
    assert [n for n, _ in select_modules(model, ["gate"])] == ["0.gate"]
    assert [n for n, _ in select_modules(model, ["re:.*\\.gate"])] == ["0.gate"]
    assert "0.gate" not in [n for n, _ in select_modules(model, [nn.Linear])]
