"""FP8Linear / Int8Linear / FP4Linear: forwards against the formulas written here, quantize_ and
recipe wiring, configs and refusals; the FP8 GPU path (torch._scaled_mm) against the reference."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchcompress as tc
from torchcompress.errors import ConfigError, RecipeError
from torchcompress.nn.scheme_linear import FP4Linear, FP8Linear, Int8Linear
from torchcompress.quant.scheme_config import FP4Config, FP8Config, SmoothQuantConfig, W8A8Int8Config


def _lin(k=128, n=48, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def test_fp8_w8a8_forward_is_the_formula():
    lin, x = _lin(), torch.randn(3, 7, 128)
    m = FP8Linear.from_linear(lin, FP8Config())
    s_w = lin.weight.detach().abs().amax(1, keepdim=True) / 448
    w_hat = (lin.weight.detach() / s_w).to(torch.float8_e4m3fn).float() * s_w
    s_x = x.abs().amax(-1, keepdim=True) / 448
    x_hat = (x / s_x).to(torch.float8_e4m3fn).float() * s_x
    torch.testing.assert_close(m(x), F.linear(x_hat, w_hat, lin.bias), rtol=1e-6, atol=1e-6)
    assert m.weight.dtype == torch.float8_e4m3fn and m.weight_bits() == 128 * 48 * 8 + 48 * 32


def test_fp8_block_weight_only_forward_keeps_activations_float():
    lin, x = _lin(200, 130), torch.randn(4, 200)
    m = FP8Linear.from_linear(lin, FP8Config("block", "none", 64))
    assert m.weight_scale.shape == (3, 4)
    torch.testing.assert_close(m(x), F.linear(x, m.dequantize(), lin.bias), rtol=1e-6, atol=1e-6)


def test_int8_w8a8_forward_is_the_formula():
    lin, x = _lin(), torch.randn(5, 128) * torch.logspace(-1, 1, 128)
    m = Int8Linear.from_linear(lin)
    s_w = lin.weight.detach().abs().amax(1, keepdim=True) / 127
    assert torch.equal(m.weight, torch.round(lin.weight.detach() / s_w).to(torch.int8))
    s_x = x.abs().amax(-1, keepdim=True) / 127
    x_hat = torch.round(x / s_x) * s_x
    torch.testing.assert_close(m(x), F.linear(x_hat, m.weight.float() * s_w, lin.bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt,floor_db", [("nvfp4", 15.0), ("mxfp4", 14.0)])
def test_fp4_forward_quantizes_activations_too(fmt, floor_db):
    lin, x = _lin(), torch.randn(6, 128)
    m = FP4Linear.from_linear(lin, FP4Config(fmt), input_absmax=x.abs().max())
    a16 = FP4Linear.from_linear(lin, FP4Config(fmt, activations=False))
    y, y16, ref = m(x), a16(x), lin(x)
    torch.testing.assert_close(y16, F.linear(x, m.dequantize(), lin.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, y16)  # activations quantized
    sqnr = lambda a: float(20 * torch.log10(ref.norm() / (ref - a).norm()))  # noqa: E731
    assert sqnr(y) > floor_db and sqnr(y16) > sqnr(y)  # measured: nvfp4 17.6 / 20.4 dB, mxfp4 15.6 / 17.9 dB


def test_quantize_verb_and_bf16_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    x = torch.randn(4, 64)
    ref = model(x)
    tc.quantize_(model, FP8Config(), ignore=())
    assert isinstance(model[0], FP8Linear) and isinstance(model[2], FP8Linear)
    y = model(x)
    assert 20 * torch.log10(ref.norm() / (ref - y).norm()) > 25  # measured 26.6 to 28.1 dB over seeds 0-4
    yb = model(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y, rtol=3e-2, atol=3e-2)


def test_refusals_name_the_layer_and_field():
    with pytest.raises(ConfigError, match="model.q.weight: NVFP4 activations need a calibrated input range"):
        FP4Linear.from_linear(_lin(), FP4Config("nvfp4"), "model.q.weight")
    with pytest.raises(ConfigError, match="up.weight.*multiple of the FP4 block size 32"):
        FP4Linear.from_linear(_lin(48), FP4Config("mxfp4"), "up.weight")
    for bad in (lambda: FP8Config("row"), lambda: FP8Config(activations="static"), lambda: FP8Config(block_size=0),
                lambda: SmoothQuantConfig(alpha=2), lambda: SmoothQuantConfig(alpha=True), lambda: FP4Config("fp4"),
                lambda: FP4Config(activations="yes"), lambda: W8A8Int8Config(symmetric=False)):
        with pytest.raises(ConfigError):
            bad()


def test_bundled_recipes_parse_and_bad_fields_name_their_line():
    from torchcompress.recipe.schema import load_recipe, parse_recipe

    kinds = {r: [type(s.config) for s in load_recipe(r).stages] for r in
             ("fp8-w8a8", "fp8-block", "w8a8-int8-smoothquant", "nvfp4", "mxfp4")}
    assert kinds["w8a8-int8-smoothquant"] == [SmoothQuantConfig, W8A8Int8Config]
    assert load_recipe("fp8-block").stages[0].config == FP8Config("block", "none", 128)
    assert FP4Config("nvfp4").needs_calibration and not FP4Config("mxfp4").needs_calibration
    with pytest.raises(RecipeError, match=r"r.yaml:4: stages\[0\].alpha"):
        parse_recipe("name: r\nstages:\n  - kind: smoothquant\n    alpha: 3\n", "r.yaml")


def test_recipe_runs_on_a_tiny_model_and_reports_layers():
    pytest.importorskip("transformers")
    from tests.tiny import calibrated_tiny_llama
    from torchcompress.recipe import compress, load_recipe

    model, _tok, calib = calibrated_tiny_llama()
    rep = compress(model, load_recipe("w8a8-int8-smoothquant"), calib)
    assert [s.modules for s in rep.stages] == [2, 14]  # 2 blocks smoothed, 14 Linears replaced
    assert all(r.sqnr_db > 38 for r in rep.layers if r.kind == "w8a8_int8")  # int8 per channel: measured >= 42.3 dB
    assert rep.compression_ratio > 1.5


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a GPU with FP8 (compute capability >= 8.9)")
def test_scaled_mm_path_matches_the_reference(monkeypatch):
    lin = _lin(512, 256).cuda()
    m = FP8Linear.from_linear(lin, FP8Config())
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    fast = m(x)
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")
    ref = m(x)
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cfg", [W8A8Int8Config(), FP4Config("mxfp4")])
def test_own_manifest_round_trip_once_registered(cfg, tmp_path, monkeypatch):
    # formats/checkpoint.py does not list these kinds yet (register_manifest_kinds does); FP8 and NVFP4 hold
    # float8 tensors, which its NaN check (Tensor.isfinite, not implemented for float8) refuses: not covered
    pytest.importorskip("transformers")
    from tests.tiny import calibrated_tiny_llama
    from torchcompress.formats import checkpoint
    from torchcompress.nn.scheme_linear import register_manifest_kinds
    from torchcompress.quant.schemes import apply_scheme_

    monkeypatch.setattr(checkpoint, "MODULE_KINDS", dict(checkpoint.MODULE_KINDS))
    register_manifest_kinds(checkpoint.MODULE_KINDS)
    model, tok, calib = calibrated_tiny_llama(samples=2)
    apply_scheme_(model, cfg, calib)
    checkpoint.save_compressed(model, tmp_path / "m", tok)
    back = checkpoint.load_compressed(tmp_path / "m")
    for name, m in model.named_modules():
        if isinstance(m, (Int8Linear, FP4Linear)):
            b = back.get_submodule(name)
            assert type(b) is type(m) and b.config == m.config
            for k, t in m.named_buffers():
                assert torch.equal(getattr(b, k).view(torch.uint8), t.view(torch.uint8)), (name, k)
    ids = calib.input_ids[:1]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize("cfg", [FP8Config(), W8A8Int8Config(), FP4Config("mxfp4"), FP4Config("nvfp4", False)])
def test_pruned_layers_keep_their_zeros(cfg):
    from torchcompress.prune import MagnitudePruneConfig
    from torchcompress.quant.schemes import apply_scheme_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    tc.prune_(model, MagnitudePruneConfig(n=2, m=4), ignore=())
    masks = [model[0].mask.clone(), model[2].mask.clone()]
    apply_scheme_(model, cfg, ignore=())
    for m, mask in zip((model[0], model[2]), masks):
        w = m.dequantize()
        assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
        assert bool((w[mask] != 0).float().mean() > 0.95)  # kept weights mostly stay non-zero
