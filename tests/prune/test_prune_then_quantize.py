"""Pruning then RTN: the pruned weights stay exactly zero in the quantized layer, and the recipe composes."""

import pytest
import torch
import torch.nn as nn

import torchcompress as tc
from torchcompress.nn.pruned_linear import PrunedLinear
from torchcompress.nn.quant_linear import QuantLinear
from torchcompress.prune.config import MagnitudePruneConfig


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_rtn_keeps_the_sparsity(symmetric, nm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    tc.prune_(model, MagnitudePruneConfig(0.5, n=nm[0], m=nm[1]), ignore=())
    masks = {i: model[i].mask.clone() for i in (0, 2)}
    assert all(isinstance(model[i], PrunedLinear) for i in (0, 2))
    tc.quantize_(model, tc.RTNConfig(tc.QuantScheme(bits=4, group_size=32, symmetric=symmetric)), ignore=())
    for i in (0, 2):
        assert isinstance(model[i], QuantLinear)
        w = model[i].dequantize()
        assert torch.all(w[~masks[i]] == 0)  # exactly zero where pruned
        assert int((w == 0).sum()) >= int((~masks[i]).sum())


def test_prune_then_rtn_recipe_composes():
    from torchcompress.recipe import compress, parse_recipe

    recipe = parse_recipe("""
name: sparse-w4
stages:
  - {kind: prune_magnitude, name: p, sparsity: 0.5, targets: [Linear]}
  - kind: rtn
    name: q
    scheme: {bits: 4, group_size: 32, symmetric: false}
    targets: [Linear]
""")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    report = compress(model, recipe)
    assert [s.modules for s in report.stages] == [2, 2]
    assert all(isinstance(model[i], QuantLinear) for i in (0, 2))


@pytest.mark.parametrize("pattern", ["sparsity: 0.5", "sparsity: 0.5, n: 2, m: 4"])
def test_prune_then_gptq_keeps_the_masks(tiny, pattern):
    """GPTQ after pruning quantizes the kept weights only: every pruned weight stays exactly 0, and
    the quantized sparse model is closer to the pruned float model than RTN of it is."""
    import copy

    from torchcompress.recipe import compress, parse_recipe

    model, _, calib = tiny
    pruned = copy.deepcopy(model)
    compress(pruned, parse_recipe(f"name: p\nstages:\n  - {{kind: prune_magnitude, name: p, {pattern}}}\n"))
    masks = {n: m.mask.clone() for n, m in pruned.named_modules() if isinstance(m, PrunedLinear)}
    assert masks
    quant = "scheme: {bits: 3, group_size: 32, symmetric: false}"
    g, r = copy.deepcopy(pruned), copy.deepcopy(pruned)
    report = compress(g, parse_recipe(f"name: q\nstages:\n  - {{kind: gptq, name: q, act_order: true, {quant}}}\n"), calib)
    compress(r, parse_recipe(f"name: r\nstages:\n  - {{kind: rtn, name: r, {quant}}}\n"))
    assert report.stages[0].modules == len(masks)
    for n, keep in masks.items():
        w = g.get_submodule(n).dequantize()
        assert torch.all(w[~keep] == 0), n
    ids = calib.input_ids
    with torch.no_grad():
        ref = pruned(ids).logits
        err_g = float(((g(ids).logits - ref) ** 2).mean())
        err_r = float(((r(ids).logits - ref) ** 2).mean())
    assert err_g < 0.5 * err_r, (err_g, err_r)  # measured 0.21 of RTN's logit error (both patterns)
