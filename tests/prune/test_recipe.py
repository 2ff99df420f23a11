import copy

import pytest

from torchcompress.errors import RecipeError
from torchcompress.nn.pruned_linear import PrunedLinear
from torchcompress.prune import SparseGPTConfig, StructuredPruneConfig, WandaConfig
from torchcompress.recipe.runner import compress
from torchcompress.recipe.schema import load_recipe, parse_recipe


def test_bundled_recipes_parse():
    assert load_recipe("wanda-50").stages[0].config == WandaConfig(0.5)
    assert load_recipe("sparsegpt-2of4").stages[0].config == SparseGPTConfig(n=2, m=4)
    cfg = load_recipe("structured-mlp-25").stages[0].config
    assert cfg == StructuredPruneConfig(0.25, importance="activation") and cfg.needs_calibration


def test_bad_stage_names_line():
    text = "stages:\n  - kind: wanda\n    sparsity: 0.5\n    n: 3\n    m: 3\n"
    with pytest.raises(RecipeError, match=r":4: .*n.*0 < N < M"):
        parse_recipe(text)
    with pytest.raises(RecipeError, match=r":3: .*unknown key 'sparsty'"):
        parse_recipe("stages:\n  - kind: prune_magnitude\n    sparsty: 0.5\n")
    with pytest.raises(RecipeError, match=r":3: .*mlp_ratio"):
        parse_recipe("stages:\n  - kind: prune_structured\n    mlp_ratio: 1.5\n")


def test_compress_wanda_then_report(tiny):
    model, _, calib = copy.deepcopy(tiny[0]), tiny[1], tiny[2]
    rep = compress(model, load_recipe("wanda-50"), calib)
    assert rep.stages[0].modules == 14 and all(r.kind == "wanda" for r in rep.layers)
    assert all(r.sqnr_db is not None and 0 < r.sqnr_db < 20 for r in rep.layers)
    assert sum(isinstance(m, PrunedLinear) for m in model.modules()) == 14


def test_compress_structured_shrinks(tiny):
    model, _, calib = copy.deepcopy(tiny[0]), tiny[1], tiny[2]
    rep = compress(model, load_recipe("structured-mlp-25"), calib)
    assert rep.size_bytes_after < rep.size_bytes_before
    assert model.config.intermediate_size == 150
    assert all(r.bytes_after < r.bytes_before for r in rep.layers) and len(rep.layers) == 6
