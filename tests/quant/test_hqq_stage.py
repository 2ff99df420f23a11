"""HQQ as a stage: quantize_ with HQQConfig gives normal QuantLinears (forward, kernels, save/load,
exports), the typed config and the bundled recipe."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchcompress as tc
from torchcompress.config import HQQConfig, QuantScheme
from torchcompress.errors import ConfigError, FormatError, RecipeError
from torchcompress.nn.quant_linear import QuantLinear
from torchcompress.ops.int_linear import _reference
from torchcompress.primitives.hqq import quantize_hqq

FLOAT_Z = QuantScheme(bits=4, group_size=32, symmetric=False, float_zero=True)


def make_seq(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 40, bias=False))


@pytest.mark.parametrize("scheme", [FLOAT_Z, QuantScheme(bits=3, group_size=32, symmetric=False),
                                    QuantScheme(bits=4, group_size=64, symmetric=True)], ids=["float-zero", "int-zero", "sym"])
def test_quantize_gives_quant_linear_with_the_primitive_codes(scheme):
    model = make_seq()
    w0 = model[0].weight.detach().clone()
    tc.quantize_(model, HQQConfig(scheme, optimize_scale=scheme.symmetric), ignore=())
    ql = model[0]
    assert isinstance(ql, QuantLinear) and ql.is_packed and isinstance(model[2], QuantLinear)
    q = quantize_hqq(w0, scheme, optimize_scale=scheme.symmetric)
    from torchcompress.primitives.affine import dequantize_affine

    w_hat = dequantize_affine(q.codes, q.scale, q.zero, scheme.bits, q.group_size)
    assert torch.equal(ql.dequantize(), w_hat)
    x = torch.randn(3, 96)
    torch.testing.assert_close(ql(x), F.linear(x, w_hat, ql.bias), rtol=1e-5, atol=1e-5)
    assert ql.weight_bits() == ql.qweight.numel() * 8 + ql.scale.numel() * 16 + (
        0 if ql.zero is None else ql.zero.numel() * ql.zero.element_size() * 8)


def test_float_zero_cpu_path_equals_reference():
    """The native CPU kernel reads uint8 zeros: float zeros must take the reference path, same result."""
    model = make_seq()
    tc.quantize_(model, HQQConfig(FLOAT_Z), ignore=())
    ql = model[0]
    assert ql.zero.dtype == torch.float16
    x = torch.randn(5, 96)
    ref = _reference(x, ql.qweight, ql.scale, ql.zero, ql.bias, 4, 32, 96)
    assert torch.equal(ql(x), ref)


def test_save_load_round_trip_float_zero(tmp_path):
    model = make_seq()
    tc.quantize_(model, HQQConfig(FLOAT_Z), ignore=())
    tc.save_compressed(model, tmp_path / "m")
    with torch.device("meta"):
        skel = make_seq()
    loaded = tc.load_compressed(tmp_path / "m", skel)
    assert loaded[0].scheme == FLOAT_Z and loaded[0].zero.dtype == torch.float16
    for k, v in model.state_dict().items():
        assert v.dtype == loaded.state_dict()[k].dtype and torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randn(2, 96)
    assert torch.equal(loaded(x), model(x))


def test_integer_zero_manifest_unchanged():
    assert "float_zero" not in QuantScheme(bits=4, symmetric=False).to_dict()
    assert QuantScheme.from_dict(FLOAT_Z.to_dict()) == FLOAT_Z


def test_exports_refuse_float_zero(tmp_path):
    from torchcompress.formats.compressed_tensors import _tensors
    from torchcompress.formats.gptq import gptq_tensors

    model = make_seq()
    tc.quantize_(model, HQQConfig(FLOAT_Z), ignore=())
    with pytest.raises(FormatError, match="0.*float zero"):
        gptq_tensors("0", model[0])
    with pytest.raises(FormatError, match="0.*float zero"):
        _tensors("0", model[0])


def test_config_validation():
    with pytest.raises(ConfigError, match="float_zero"):
        QuantScheme(bits=4, symmetric=True, float_zero=True)
    with pytest.raises(ConfigError, match="lp_norm"):
        HQQConfig(lp_norm=1.5)
    with pytest.raises(ConfigError, match="kappa"):
        HQQConfig(kappa=0.5)
    with pytest.raises(ConfigError, match="iters"):
        HQQConfig(iters=-1)
    with pytest.raises(ConfigError, match="optimize_scale"):
        HQQConfig(QuantScheme(bits=4, symmetric=True), optimize_scale=False)


def test_bundled_recipe_runs():
    from torchcompress.recipe import compress, load_recipe
    from torchcompress.recipe.schema import parse_recipe

    r = load_recipe("w4-hqq-g64")
    cfg = r.stages[0].config
    assert isinstance(cfg, HQQConfig) and cfg.scheme.bits == 4 and cfg.scheme.group_size == 64 and cfg.scheme.float_zero
    model = make_seq()
    rep = compress(model, r)
    assert isinstance(model[0], QuantLinear) and rep.layers[0].sqnr_db > 15
    with pytest.raises(RecipeError, match="lp_norm"):
        parse_recipe("stages:\n  - kind: hqq\n    lp_norm: 2\n")
