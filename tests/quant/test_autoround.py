"""Sign-gradient rounding on the block pipeline: RTN at iters=0, lower block output error than RTN,
packed layers = the learned fake quantizer, seeded determinism, the recipe kind."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import torchcompress as tc
from torchcompress.config import QuantScheme, RTNConfig
from torchcompress.errors import ConfigError
from torchcompress.nn.quant_linear import QuantLinear
from torchcompress.pipeline.context import BlockContext, capture_inputs
from torchcompress.pipeline.skeleton import find_blocks
from torchcompress.quant.autoround import autoround_block, autoround_linears, autoround_model
from torchcompress.quant.autoround_config import AutoRoundConfig

SCHEME = QuantScheme(bits=4, group_size=64, symmetric=False)


@pytest.fixture(scope="module")
def tiny():
    from tests.tiny import calibrated_tiny_llama

    return calibrated_tiny_llama(hidden_size=128, intermediate_size=192, samples=8, seq_len=32)


def _quant_state(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith(("qweight", "scale", "zero"))}


def test_zero_iterations_is_round_to_nearest(tiny):
    model, _, calib = tiny
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    autoround_model(a, AutoRoundConfig(SCHEME, iters=0), calib)
    tc.quantize_(b, RTNConfig(SCHEME))
    sa, sb = _quant_state(a), _quant_state(b)
    assert sa.keys() == sb.keys() and len(sa) == 2 * 7 * 3  # 2 blocks x 7 linears x (qweight, scale, zero)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _block0(model, calib):
    prefix, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks, calib.batches(8), "cpu")
    return BlockContext(blocks[0], f"{prefix}.0.", inputs, "cpu", 0), prefix


def _err(ctx, target):
    """Masked mean squared error of the block's outputs against ``target`` over every batch."""
    num, den = 0.0, 0
    with torch.no_grad():
        for i in range(len(ctx.inputs)):
            d = (ctx.forward(i) - target[i])[ctx.inputs.masks[i].bool()]
            num, den = num + float(d.pow(2).sum()), den + d.numel()
    return num / den


def test_block_error_below_rtn_and_packed_equals_learned(tiny):
    """One captured batch and batch_size = its rows: every step sees the whole batch, so the kept loss
    is the learned fake quantizer's error on it; the packed block must reproduce it."""
    model, _, calib = tiny
    m = copy.deepcopy(model)
    ctx, prefix = _block0(m, calib)
    with torch.no_grad():
        target = ctx.outputs()
    rtn_block = copy.deepcopy(ctx.block)
    tc.quantize_(rtn_block, RTNConfig(SCHEME))
    rtn_ctx = BlockContext(rtn_block, ctx.prefix, ctx.inputs, "cpu", 0)
    err_rtn = _err(rtn_ctx, target)
    losses = []
    cfg = AutoRoundConfig(SCHEME, iters=100, batch_size=8)
    with torch.no_grad():  # as the pipeline calls it
        autoround_block(ctx, cfg, autoround_linears(ctx.block, ctx.prefix, [nn.Linear], ()),
                        on_block_loss=lambda name, first, kept: losses.append((first, kept)))
    assert all(isinstance(mod, QuantLinear) for n, mod in ctx.block.named_modules() if n.endswith("_proj"))
    err = _err(ctx, target)
    (first, kept), = losses
    # step 0 is RTN: its loss is RTN's error (F.linear of the dequantized weight vs the packed kernel:
    # measured relative difference 0 on this CPU; 1e-4 leaves room for other kernels' summation order)
    assert first == pytest.approx(err_rtn, rel=1e-4)
    assert err == pytest.approx(kept, rel=1e-4)  # the packed block = the kept fake-quantized one
    # measured: err / err_rtn = 0.115; a run that learned nothing (or packed RTN) gives 1
    assert err < 0.5 * err_rtn


def test_deterministic_under_a_seed(tiny):
    model, _, calib = tiny
    cfg = AutoRoundConfig(SCHEME, iters=15, batch_size=3, seed=7)  # 3 of 8 rows a step: the draw matters
    runs = []
    for c in (cfg, cfg, AutoRoundConfig(SCHEME, iters=15, batch_size=3, seed=8)):
        m = copy.deepcopy(model)
        autoround_model(m, c, calib)
        runs.append(_quant_state(m))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # another seed, other mini-batches


def test_recipe_kind_and_bundled_recipe(tiny):
    from torchcompress.recipe.runner import compress
    from torchcompress.recipe.schema import load_recipe, parse_recipe

    r = load_recipe("w4-autoround-g128")
    cfg = r.stages[0].config
    assert isinstance(cfg, AutoRoundConfig) and cfg.iters == 200 and cfg.step_lr == pytest.approx(1 / 200)
    assert cfg.scheme == QuantScheme(bits=4, group_size=128, symmetric=False)
    model, _, calib = tiny
    m = copy.deepcopy(model)
    small = parse_recipe("stages:\n  - kind: autoround\n    iters: 3\n    scheme: {bits: 3, group_size: 32, symmetric: true}\n")
    rep = compress(m, small, calib)
    assert len(rep.layers) == 14 and all(r.bits_per_weight is not None for r in rep.layers)
    assert m.model.layers[1].mlp.down_proj.scheme.bits == 3
    with pytest.raises(Exception, match="iters"):
        parse_recipe("stages:\n  - kind: autoround\n    iters: -2\n")


def test_needs_calibration(tiny):
    model, _, _ = tiny
    with pytest.raises(ConfigError, match="calibration"):
        autoround_model(copy.deepcopy(model), AutoRoundConfig(SCHEME, iters=1), None)
