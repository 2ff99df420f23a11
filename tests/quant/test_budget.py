"""Mixed precision under a size budget: candidate bytes equal the modules', the sensitivity proxy
against a direct formula and its monotonicity in bits, budgets respected by the saved output, typed
errors for budgets out of range, the on-disk cache."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from torchcompress.errors import ConfigError
from torchcompress.quant.budget import (BudgetError, Option, budget_model, option_bytes, options_for, output_error,
                                        quant_dequant, scheme_of)
from torchcompress.quant.budget_config import BudgetConfig, parse_size


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):  # the default cache (~/.cache) is never written by tests
    monkeypatch.setenv("TORCHCOMPRESS_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def tiny():
    from tests.tiny import calibrated_tiny_llama

    # hidden 128 (blocks of 32 fit), intermediate 256 (down_proj fits the K-quants' 256)
    return calibrated_tiny_llama(hidden_size=128, intermediate_size=256, samples=8, seq_len=32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [96, 200, 256])
def test_option_bytes_equal_quantlinear(symmetric, k):
    from torchcompress.nn.quant_linear import QuantLinear

    cfg = BudgetConfig(target_bpw=4, method="rtn", symmetric=symmetric)
    lin = nn.Linear(k, 24)
    for opt in options_for(cfg, 24, k):
        q = QuantLinear.from_linear(lin, scheme_of(cfg, opt))
        assert option_bytes(cfg, opt, 24, k) * 8 == q.weight_bits(), opt


def test_option_bytes_equal_gguflinear():
    from torchcompress.nn.gguf_linear import GGUFLinear
    from torchcompress.primitives.gguf_common import GGMLType

    cfg = BudgetConfig(target_bpw=4, method="gguf")
    lin = nn.Linear(256, 8)
    opts = options_for(cfg, 8, 256)
    assert len(opts) == len(cfg.gguf_types)  # 256 fits every type
    for opt in opts:
        g = GGUFLinear.from_linear(lin, GGMLType(opt.qtype))
        assert option_bytes(cfg, opt, 8, 256) * 8 == g.weight_bits(), opt.label
    assert {o.label for o in options_for(cfg, 8, 96)} == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"}


def _layer(seed=0, n=64, k=256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 3] *= 8  # an outlier column
    x = torch.randn(512, k, generator=g) @ (torch.eye(k) + 0.1 * torch.randn(k, k, generator=g))  # correlated inputs
    return w, 2 * x.T @ x / x.shape[0]


def test_output_error_is_the_trace_formula():
    w, h = _layer()
    cfg = BudgetConfig(target_bpw=4, method="rtn")
    w_hat = quant_dequant(w, cfg, Option("W3 g64", 3, 64))
    e = (w - w_hat).double()
    want = float(torch.trace(e @ h.double() @ e.T))
    # float32 matmul inside vs a float64 trace: measured relative gap ~1e-7; 1e-5 leaves margin
    assert output_error(w, w_hat, h) == pytest.approx(want, rel=1e-5)
    want_diag = float((e.square() * torch.diagonal(h).double()).sum())
    assert output_error(w, w_hat, torch.diagonal(h)) == pytest.approx(want_diag, rel=1e-5)


@pytest.mark.parametrize("hess", ["full", "diag"])
@pytest.mark.parametrize("gs", [32, 128])
def test_sensitivity_decreases_with_bits(hess, gs):
    w, h = _layer(1)
    h = h if hess == "full" else torch.diagonal(h)
    cfg = BudgetConfig(target_bpw=4, method="rtn")
    losses = [output_error(w, quant_dequant(w, cfg, Option("", b, gs)), h) for b in (2, 3, 4, 5, 6, 8)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    # each extra bit cuts the error about 4x (halved step): at least 2.5x for every step
    assert all(a / b > 2.5 for a, b in zip(losses[1:], losses[2:])), losses


def test_gguf_sensitivity_decreases_with_bits():
    w, h = _layer(2)
    cfg = BudgetConfig(target_bpw=4, method="gguf")
    order = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    opts = {o.label: o for o in options_for(cfg, *w.shape)}
    losses = [output_error(w, quant_dequant(w, cfg, opts[t]), h) for t in order]
    assert all(a > b for a, b in zip(losses, losses[1:])), dict(zip(order, losses))


def _saved_layer_bytes(out, names):
    """Bytes of the targeted layers' weight tensors (codes, scales, zeros / blocks) in the saved files."""
    from safetensors import safe_open

    total, found = 0, set()
    for f in sorted(out.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                mod, _, leaf = key.rpartition(".")
                if mod in names and leaf in ("qweight", "scale", "zero", "blocks",  # ours
                                             "weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
                    t = sf.get_tensor(key)
                    total += t.numel() * t.element_size()
                    found.add(mod)
    assert found == set(names)
    return total


@pytest.mark.parametrize("method,target,hessian", [("rtn", 4.5, "diag"), ("gptq", 3.5, "diag"), ("gguf", 5.0, "diag"),
                                                   ("rtn", 4.0, "full")])
def test_budget_respected_by_saved_output(tiny, tmp_path, method, target, hessian):
    from torchcompress.formats.checkpoint import load_compressed, save_compressed

    model, tok, calib = tiny
    m = copy.deepcopy(model)
    cfg = BudgetConfig(target_bpw=target, method=method, cache_dir=str(tmp_path / "cache"), hessian=hessian)
    plan = budget_model(m, cfg, calib)
    save_compressed(m, tmp_path / "out")
    params = sum(model.get_submodule(n).weight.numel() for n in plan.choice)
    # the plan counts the modules' buffers (codes, scales, zeros / blocks) exactly, as they reload
    loaded = load_compressed(tmp_path / "out")
    held = sum(t.numel() * t.element_size() for n in plan.choice
               for k, t in loaded.get_submodule(n).state_dict().items() if k in ("qweight", "scale", "zero", "blocks"))
    assert held == plan.layer_bytes
    # on disk: ours verbatim, or compressed-tensors (zero points packed to b bits, codes padded to int32 words,
    # a 16-byte weight_shape): never more than the plan
    got = _saved_layer_bytes(tmp_path / "out", set(plan.choice))
    assert got <= plan.layer_bytes and got > 0.9 * plan.layer_bytes, (got, plan.layer_bytes)
    assert got * 8 / params <= target
    assert got * 8 / params > target - 0.5  # and the budget is used (a search that picks the cheapest passes the first)
    assert len({o.label for o in plan.choice.values()}) > 1  # a mix, not one uniform width


def test_target_size_respected_on_disk(tiny, tmp_path):
    """--target-size counts the weights file: a budget equal to a uniform W4 g64 RTN file's size gives a
    mixed file no larger, and within the header allowance (a few KB here) of it."""
    import torchcompress as tc
    from torchcompress.config import QuantScheme, RTNConfig
    from torchcompress.formats.checkpoint import save_compressed

    model, tok, calib = tiny
    uni = tc.quantize_(copy.deepcopy(model), RTNConfig(QuantScheme(bits=4, group_size=64, symmetric=False)),
                       ignore=["lm_head"])
    save_compressed(uni, tmp_path / "uniform")
    target = sum(f.stat().st_size for f in (tmp_path / "uniform").glob("model*.safetensors"))
    m = copy.deepcopy(model)
    budget_model(m, BudgetConfig(target_size=target, method="rtn", cache_dir=str(tmp_path / "c")), calib)
    save_compressed(m, tmp_path / "out")
    disk = sum(f.stat().st_size for f in (tmp_path / "out").glob("model*.safetensors"))
    assert disk <= target
    assert disk > target - 8192, (disk, target)


@pytest.mark.parametrize("spec", [dict(target_bpw=1.5), dict(target_bpw=40.0), dict(target_size="1KB"),
                                  dict(target_size="5GB")])
def test_budget_out_of_range_is_a_typed_error(tiny, spec):
    model, tok, calib = tiny
    m = copy.deepcopy(model)
    with pytest.raises(BudgetError) as e:
        budget_model(m, BudgetConfig(method="rtn", **spec), calib)
    msg = str(e.value)
    assert "\n" not in msg and "feasible range" in msg
    assert ("target_bpw" in msg and f"{spec.get('target_bpw', 0):g}" in msg) or str(spec.get("target_size")) in msg
    assert all(type(mod) is nn.Linear for n, mod in m.named_modules() if n.endswith("proj"))  # nothing changed


def test_bpw_range_ends(tiny):
    """The lowest feasible bpw is every layer at 2 bits g128 (asymmetric: codes + fp16 scale + u8 zero per
    128); the highest is float32."""
    model, tok, calib = tiny
    with pytest.raises(BudgetError) as e:
        budget_model(copy.deepcopy(model), BudgetConfig(target_bpw=2.0, method="rtn"), calib)
    lo = 2 + 24 / 128  # K = 128 and 256 are whole groups
    assert f"{lo:.3f} .. 32.000" in str(e.value)
    budget_model(copy.deepcopy(model), BudgetConfig(target_bpw=lo, method="rtn", cache_dir=None), calib)  # the end itself is feasible


def test_config_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        BudgetConfig()
    with pytest.raises(ConfigError, match="bits"):
        BudgetConfig(target_bpw=4, bits=[4, 7])
    with pytest.raises(ConfigError, match="gguf_types"):
        BudgetConfig(target_bpw=4, gguf_types=["Q4_K", "Q9"])
    with pytest.raises(ConfigError, match="target_size"):
        BudgetConfig(target_size="80 parsecs")
    assert parse_size("80MB") == 80_000_000 and parse_size("1.5MiB") == 1572864 and parse_size(123) == 123


def test_cache_hit_and_miss(tiny, tmp_path, monkeypatch):
    from torchcompress.quant import budget

    model, tok, calib = tiny
    cfg = BudgetConfig(target_bpw=4.0, method="rtn", cache_dir=str(tmp_path))
    first = budget_model(copy.deepcopy(model), cfg, calib)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def boom(*a, **k):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(budget, "layer_losses", boom)
    second = budget_model(copy.deepcopy(model), cfg, calib)  # from the cache
    assert second.choice == first.choice and second.predicted_loss == first.predicted_loss
    from torchcompress.calibration.data import CalibrationSet

    other = CalibrationSet(calib.input_ids.flip(0), calib.attention_mask.flip(0))  # other data: a miss
    with pytest.raises(AssertionError, match="measured again"):
        budget_model(copy.deepcopy(model), cfg, other)
    changed = copy.deepcopy(model)
    changed.model.layers[0].mlp.up_proj.weight.data[0, 0] += 1  # another model: a miss
    with pytest.raises(AssertionError, match="measured again"):
        budget_model(changed, cfg, calib)


def test_larger_budget_lower_predicted_loss(tiny, tmp_path):
    model, tok, calib = tiny
    losses = [budget_model(copy.deepcopy(model), BudgetConfig(target_bpw=t, method="rtn", cache_dir=str(tmp_path)),
                           calib).predicted_loss for t in (3.0, 4.0, 5.0, 6.0)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert math.isfinite(losses[0])


def test_relative_losses_ignore_the_scale_of_a_layers_activations():
    """``relative``: each layer's error over its output energy tr(W H W^T), so a layer whose inputs are
    1000x larger (errors and energy both 1e6x) gets the same plan; the raw sum moves bits to it."""
    from torchcompress.quant.budget import BudgetPlanner

    cfg = BudgetConfig(target_bpw=3.4, method="rtn", bits=[2, 3, 4, 5], group_sizes=[128])
    shapes = {"a": (64, 256), "b": (64, 256), "c": (64, 256)}
    base = {n: [16.0 ** -i * (1 + 0.1 * j) for i in range(4)] for j, n in enumerate(shapes)}

    def plan(scale_b, relative):
        c = BudgetConfig(**{**cfg.__dict__, "relative": relative})
        p = BudgetPlanner(c, shapes, float_bytes=3 * 64 * 256 * 4, fixed_bytes=0)
        p.losses = {n: [v * (scale_b if n == "b" else 1) for v in ls] for n, ls in base.items()}
        p.energy = {n: 10.0 * (scale_b if n == "b" else 1) for n in shapes}
        return {n: o.label for n, o in p.solve().choice.items()}

    assert plan(1e6, True) == plan(1.0, True)
    assert plan(1e6, False) != plan(1.0, False)
    assert plan(1e6, False)["b"] == "W5 g128"
