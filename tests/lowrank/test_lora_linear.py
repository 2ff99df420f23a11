"""LoRALinear on float and quantized bases: scaling, init, merge/unmerge, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from torchcompress import ConfigError, QuantScheme
from torchcompress.errors import InputError
from torchcompress.nn.gguf_linear import GGUFLinear
from torchcompress.nn.lora_linear import LoRALinear, MergeError
from torchcompress.nn.quant_linear import QuantLinear
from torchcompress.primitives.gguf_common import GGMLType


def _with_random_b(m: LoRALinear) -> LoRALinear:
    nn.init.normal_(m.lora_B.weight, std=0.1)
    return m


def _bases():
    lin = nn.Linear(64, 24)
    yield "float", lin
    yield "quant4", QuantLinear.from_linear(lin, QuantScheme(bits=4, group_size=32, symmetric=False))
    yield "gguf_q8_0", GGUFLinear.from_linear(lin, GGMLType.Q8_0)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_base_plus_scaled_update(rslora):
    base = nn.Linear(40, 12)
    m = _with_random_b(LoRALinear(base, r=4, alpha=6, use_rslora=rslora))
    assert m.scaling == (6 / math.sqrt(4) if rslora else 6 / 4)
    x = torch.randn(3, 5, 40)
    want = base(x) + (x @ m.lora_A.weight.T @ m.lora_B.weight.T) * m.scaling
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)


def test_default_init_is_kaiming_uniform_and_zero_b():
    m = LoRALinear(nn.Linear(300, 8), r=16)
    bound = 1 / math.sqrt(300)  # kaiming_uniform(a=sqrt(5)) on fan_in 300
    a = m.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert torch.count_nonzero(m.lora_B.weight) == 0
    g = LoRALinear(nn.Linear(300, 8), r=16, init="gaussian").lora_A.weight
    assert abs(float(g.detach().std()) - 1 / 16) < 0.01


def test_only_adapter_trains():
    base = nn.Linear(16, 8)
    m = LoRALinear(base, r=2)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


@pytest.mark.parametrize("rows", [5, 128])  # 128 rows: the native kernel's threaded tiled path
@pytest.mark.parametrize("kind,base", list(_bases()))
def test_gradients_reach_adapter_and_input_only(kind, base, rows):
    m = _with_random_b(LoRALinear(base, r=4, alpha=8))
    x = torch.randn(rows, 64, requires_grad=True)
    m(x).square().sum().backward()
    assert m.lora_A.weight.grad is not None and m.lora_A.weight.grad.abs().sum() > 0
    assert m.lora_B.weight.grad.abs().sum() > 0
    # the activation gradient includes the base's W^T term (through the quantized op's autograd)
    dense = base.weight.detach() if kind == "float" else base.dequantize(torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    ref = x2 @ dense.T + base.bias.detach() + (x2 @ m.lora_A.weight.detach().T @ m.lora_B.weight.detach().T) * m.scaling
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for p in base.parameters())


def test_merge_unmerge_float_base():
    base = nn.Linear(64, 24)
    w0 = base.weight.detach().clone()
    m = _with_random_b(LoRALinear(base, r=4, alpha=8))
    x = torch.randn(7, 64)
    y = m(x)
    assert m.merge() is None
    assert m.merged
    torch.testing.assert_close(base.weight, w0 + m.delta_weight(), rtol=0, atol=0)
    # float32 rounding of W + delta only: measured max ~1e-6 on outputs of size ~1
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=2e-6)
    m.unmerge()
    assert not m.merged
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kind,base", [b for b in _bases() if b[0] != "float"])
def test_merge_into_quantized_base_requantizes_and_reports(kind, base):
    m = _with_random_b(LoRALinear(base, r=4, alpha=8))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    target = base.dequantize(torch.float32) + m.delta_weight().detach()
    err = m.merge()
    assert type(m.base_layer) is type(base) and m.base_layer is not base
    assert err.base_kind == type(base).__name__
    got = m.base_layer.dequantize(torch.float32)
    assert err.mse == pytest.approx(float((target - got).double().square().mean()), rel=1e-6)
    assert err.max_abs == pytest.approx(float((target - got).abs().max()))
    assert 0 < err.max_abs and err.sqnr_db > (20 if kind == "quant4" else 35)  # 4-bit RTN / Q8_0 floors
    m.unmerge()  # the original quantized base comes back bit for bit
    assert m.base_layer is base
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


def test_gptq_base_merges_into_plain_quantlinear():
    from torchcompress.nn.gptq_linear import GPTQLinear
    from torchcompress.primitives.affine import quantize_affine

    scheme = QuantScheme(bits=4, group_size=16, symmetric=False)
    lin = nn.Linear(32, 8)
    perm = torch.randperm(32)
    q = quantize_affine(lin.weight.detach(), scheme)

    class R:  # a GPTQ result with a permuted g_idx
        codes, scale, zero = q.codes, q.scale, q.zero
        g_idx = (torch.arange(32) // 16)[perm]

    g = GPTQLinear.from_gptq(lin, R, scheme)
    m = _with_random_b(LoRALinear(g, r=2))
    err = m.merge()
    assert err.base_kind == "QuantLinear" and err.sqnr_db > 15


def test_bad_arguments():
    with pytest.raises(ConfigError, match="r"):
        LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ConfigError, match="init"):
        LoRALinear(nn.Linear(4, 4), r=1, init="pissa")
    with pytest.raises(InputError, match="in_features"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=1)


def test_add_lora_on_a_plain_module_and_config_errors():
    import torchcompress as tc
    from torchcompress.lowrank.lora import lora_parameters, merge_lora_

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    tc.quantize_(model, QuantScheme(bits=4, group_size=8), targets=["2"])
    tc.add_lora_(model, tc.LoRAConfig(targets=(nn.Linear, QuantLinear), r=2))
    assert isinstance(model[0], LoRALinear) and isinstance(model[2].base_layer, QuantLinear)
    assert len(lora_parameters(model)) == 4
    errs = merge_lora_(model)
    assert errs["0"] is None and errs["2"].base_kind == "QuantLinear"
    assert type(model[0]) is nn.Linear and type(model[2]) is QuantLinear
    with pytest.raises(ConfigError, match="targets"):
        tc.add_lora_(model, tc.LoRAConfig(targets=("nope",)))
    for kw, field in [({"r": 0}, "r"), ({"alpha": -1}, "alpha"), ({"dropout": 1.0}, "dropout"),
                      ({"use_rslora": 1}, "use_rslora"), ({"targets": ()}, "targets"), ({"init": "x"}, "init")]:
        with pytest.raises(ConfigError, match=field):
            tc.LoRAConfig(**kw)


def test_quantizing_after_add_lora_keeps_adapters_float():
    # lora then rtn: the base layers are quantized, the adapters stay nn.Linear (PEFT/QLoRA layout)
    import torchcompress as tc
    from torchcompress.lowrank import LoRAConfig
    from torchcompress.nn.lora_linear import LoRALinear
    from torchcompress.nn.quant_linear import QuantLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    tc.add_lora_(model, LoRAConfig(targets=("0", "2"), r=4))
    tc.quantize_(model, tc.RTNConfig(tc.QuantScheme(bits=4, group_size=32)), ignore=())
    for i in (0, 2):
        assert isinstance(model[i], LoRALinear) and isinstance(model[i].base_layer, QuantLinear)
        assert type(model[i].lora_A) is nn.Linear and type(model[i].lora_B) is nn.Linear
    assert model(torch.randn(3, 64)).shape == (3, 32)


def test_merge_into_pruned_base_keeps_sparsity_and_reports_the_loss():
    # issue 20 item 4: the update used to be added to the dense weight and cut by the mask in forward, while
    # merge() reported an exact (None) merge
    from torchcompress.nn.pruned_linear import PrunedLinear

    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    mask = torch.rand(16, 32) > 0.5
    pruned = PrunedLinear.from_linear(lin, mask)
    lora = LoRALinear(pruned, r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight, std=0.5)
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = lora(x)
        delta = lora.delta_weight()
    err = lora.merge()
    assert isinstance(err, MergeError) and err.base_kind == "PrunedLinear"
    lost = delta * ~mask  # the part of the update that lands on pruned weights
    assert err.max_abs == pytest.approx(float(lost.abs().max()), rel=1e-6)
    assert err.mse == pytest.approx(float(lost.pow(2).mean()), rel=1e-5)
    base = lora.base_layer
    assert torch.equal(base.weight[~mask], torch.zeros_like(base.weight[~mask]))  # still pruned, in the stored weight
    with torch.no_grad():
        got = lora(x)
        want = before - x @ lost.T  # the adapter's output less exactly the dropped part
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    lora.unmerge()
    with torch.no_grad():
        torch.testing.assert_close(lora(x), before, rtol=1e-5, atol=1e-5)
