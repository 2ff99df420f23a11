"""QAT with GGUF block types: fake-quant forward is our bit-exact dequantize(quantize(w)), the STE
gradient passes through, QAT beats PTQ on a toy regression, freeze gives quantize_gguf_'s bytes."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchcompress as tc
from torchcompress.errors import ConfigError, RecipeError
from torchcompress.nn.gguf_linear import GGUFLinear
from torchcompress.nn.gguf_qat import GGUFQATLinear, gguf_fake_quantize_ste
from torchcompress.primitives.gguf_blocks import dequantize, quantize_reference
from torchcompress.primitives.gguf_common import GGMLType
from torchcompress.quant.gguf import quantize_gguf_
from torchcompress.quant.gguf_config import GGUFConfig
from torchcompress.training.config import GGUF_QAT_TYPES, GGUFQATConfig, QATTrainConfig
from torchcompress.training.gguf_qat import block_type_for
from torchcompress.training.hooks import QATHook, is_qat_prepared

# block type -> llama.cpp file type whose `pure` mix uses it (Q2_K/Q3_K have no such file type here)
_PURE_FILE_TYPE = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
                   "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K"}


def _w(n=6, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :7] = 0.0  # an all-small stretch and exact zeros inside a block
    w[1, 40] = 1.5  # an outlier that decides its block's scale
    return w


@pytest.mark.parametrize("qt", GGUF_QAT_TYPES)
def test_fake_quant_forward_is_dequantize_of_quantize_exactly(qt, monkeypatch):
    t = GGMLType[qt]
    w, x = _w(), torch.randn(3, 512)
    want = dequantize(quantize_reference(w, t), t, w.shape)  # the pure-PyTorch reference quantizer
    lin = nn.Linear(512, 6)
    lin.weight.data.copy_(w)
    q = GGUFQATLinear.from_linear(lin, t)
    assert torch.equal(q.dequantize(), want)
    assert torch.equal(q(x), F.linear(x, want, lin.bias))
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")  # the same through quantize()'s own fallback
    assert torch.equal(q.dequantize(), want)


@pytest.mark.parametrize("qt", ["Q4_0", "Q8_0", "Q2_K", "Q4_K", "Q6_K"])
def test_ste_gradient_passes_through_everywhere(qt):
    """Documented choice: identity gradient, clipped weights included (Q4_0 clips the opposite extreme
    of each block's max to code 15; the gradient reaches it anyway)."""
    w = _w().requires_grad_(True)
    g = torch.randn(6, 512)
    out = gguf_fake_quantize_ste(w, GGMLType[qt])
    out.backward(g)
    assert torch.equal(w.grad, g)
    assert not torch.equal(out.detach(), w.detach())  # it did quantize


def test_layer_gradients_reach_master_weight_and_bias():
    lin = nn.Linear(256, 4)
    q = GGUFQATLinear.from_linear(lin, GGMLType.Q4_K)
    x = torch.randn(5, 256)
    q(x).pow(2).sum().backward()
    w_hat = q.dequantize()
    ref_w = w_hat.clone().requires_grad_(True)
    ref_b = lin.bias.detach().clone().requires_grad_(True)
    F.linear(x, ref_w, ref_b).pow(2).sum().backward()
    assert torch.allclose(q.weight.grad, ref_w.grad) and torch.allclose(q.bias.grad, ref_b.grad)


def _toy_regression():
    torch.manual_seed(0)
    d = 256  # rows of 256: every layer holds K-quant blocks
    mix = torch.randn(d, d) / math.sqrt(d) + torch.eye(d)  # correlated inputs
    x_tr, x_te = torch.randn(2048, d) @ mix, torch.randn(1024, d) @ mix
    target = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 8))
    return target, x_tr, target(x_tr).detach(), x_te, target(x_te).detach()


# measured held-out MSE ratio QAT / PTQ (150 Adam steps, lr 3e-4, cosine): Q4_0 0.291, Q4_K 0.655, Q3_K 0.379
@pytest.mark.parametrize("qt,bound", [("Q4_0", 0.45), ("Q4_K", 0.85), ("Q3_K", 0.55)])
def test_gguf_qat_beats_ptq_on_toy_regression(qt, bound):
    target, x_tr, y_tr, x_te, y_te = _toy_regression()
    ptq = quantize_gguf_(copy.deepcopy(target), GGUFConfig(_PURE_FILE_TYPE.get(qt, "Q4_0"), pure=True), ignore=()) \
        if qt in _PURE_FILE_TYPE else tc.freeze_(tc.quantize_(copy.deepcopy(target), GGUFQATConfig(qt), ignore=()))
    qat = tc.quantize_(copy.deepcopy(target), GGUFQATConfig(qt), ignore=())
    opt = torch.optim.Adam(qat.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 150)
    for i in range(150):
        b = slice((i * 256) % 2048, (i * 256) % 2048 + 256)
        opt.zero_grad()
        F.mse_loss(qat(x_tr[b]), y_tr[b]).backward()
        opt.step()
        sched.step()
    tc.freeze_(qat)
    assert all(isinstance(m, GGUFLinear) for m in (qat[0], qat[2])) and all(isinstance(m, GGUFLinear) for m in (ptq[0], ptq[2]))
    with torch.no_grad():
        err_ptq, err_qat = float(F.mse_loss(ptq(x_te), y_te)), float(F.mse_loss(qat(x_te), y_te))
    print(f"toy regression {qt}: PTQ {err_ptq:.3e}, QAT {err_qat:.3e} ({err_qat / err_ptq:.3f}x)")
    assert err_qat < bound * err_ptq, (err_ptq, err_qat)


def _net():
    torch.manual_seed(1)
    # rows of 256 (K-quants fit), 96 (K-quants fall back, legacy blocks fit), 40 (no block fits: float)
    return nn.Sequential(nn.Linear(96, 256), nn.ReLU(), nn.Linear(256, 40), nn.ReLU(), nn.Linear(40, 4))


@pytest.mark.parametrize("qt", GGUF_QAT_TYPES)
def test_freeze_equals_quantize_gguf_of_trained_weights_bit_for_bit(qt):
    net, x = _net(), torch.randn(16, 96)
    tc.quantize_(net, GGUFQATConfig(qt), ignore=())
    assert isinstance(net[0], GGUFQATLinear) and isinstance(net[2], GGUFQATLinear) and type(net[4]) is nn.Linear
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    y_fake = net(x).detach()
    # the trained float model, as plain Linears
    trained = nn.Sequential(*[nn.Linear(m.in_features, m.out_features) if isinstance(m, GGUFQATLinear) else copy.deepcopy(m)
                              for m in net])
    for a, b in zip(trained, net):
        if isinstance(b, GGUFQATLinear):
            a.weight.data.copy_(b.weight.detach())
            a.bias.data.copy_(b.bias.detach())
    tc.freeze_(net)
    if qt in _PURE_FILE_TYPE:
        want = quantize_gguf_(copy.deepcopy(trained), GGUFConfig(_PURE_FILE_TYPE[qt], pure=True), ignore=())
    else:  # no llama.cpp file type is pure Q2_K/Q3_K: the GGUFLinear quantize_gguf_ builds per tensor
        want = copy.deepcopy(trained)
        for i in (0, 2):
            want[i] = GGUFLinear.from_linear(trained[i], block_type_for(GGMLType[qt], trained[i].in_features))
    for i in (0, 2):
        assert isinstance(net[i], GGUFLinear) and net[i].qtype == want[i].qtype
        assert torch.equal(net[i].blocks, want[i].blocks) and torch.equal(net[i].bias, want[i].bias)
    assert type(want[4]) is nn.Linear and torch.equal(net[4].weight, want[4].weight)  # float in both
    assert net[0].qtype == GGMLType[qt] if qt.endswith("_0") or qt.endswith("_1") else net[2].qtype == GGMLType[qt]
    torch.testing.assert_close(net(x), y_fake, rtol=1e-5, atol=1e-6)  # the packed model computes what training saw


def test_shared_linear_gets_one_frozen_module():
    lin = nn.Linear(64, 64)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    tc.quantize_(net, GGUFQATConfig("Q8_0"), ignore=())
    assert net[0] is net[2] and is_qat_prepared(net)
    tc.freeze_(net)
    assert isinstance(net[0], GGUFLinear) and net[0] is net[2] and not is_qat_prepared(net)


def test_hook_prepares_and_freezes():
    net = nn.Sequential(nn.Linear(64, 8))
    hook = QATHook(GGUFQATConfig("q4_1"), ignore=())
    hook.on_train_begin(net)
    assert isinstance(net[0], GGUFQATLinear) and net[0].qtype is GGMLType.Q4_1
    hook.on_train_end(net)
    assert isinstance(net[0], GGUFLinear)


@pytest.mark.parametrize("bad", ["Q4_X", "Q4_K_M", "F16", "Q8_1", 4, None])
def test_unknown_type_is_a_config_error_naming_the_field(bad):
    with pytest.raises(ConfigError, match="qtype") as e:
        GGUFQATConfig(bad)
    assert e.value.field == "qtype"
    if bad is not None:
        with pytest.raises(ConfigError, match="qtype"):
            QATTrainConfig(qtype=bad)


def test_stage_config_rejects_scheme_or_lsq_next_to_qtype():
    with pytest.raises(ConfigError) as e:
        QATTrainConfig(qtype="Q4_0", scheme=tc.QuantScheme(bits=3))
    assert e.value.field == "scheme"
    with pytest.raises(ConfigError) as e:
        QATTrainConfig(qtype="Q4_0", learnable_scale=True)
    assert e.value.field == "learnable_scale"
    assert QATTrainConfig(qtype="q6_k").prepare_config() == GGUFQATConfig("Q6_K")


def test_recipe_bad_qtype_names_line_and_field():
    from torchcompress.recipe import parse_recipe

    with pytest.raises(RecipeError, match=r"<recipe>:5: stages\[0\]\.qtype") as e:
        parse_recipe("name: t\nstages:\n  - kind: qat\n    steps: 2\n    qtype: Q9_K\n")
    assert e.value.line == 5


def test_nan_master_weight_named_at_freeze():
    net = nn.Sequential(nn.Linear(32, 4))
    tc.quantize_(net, GGUFQATConfig("Q8_0"), ignore=())
    with torch.no_grad():
        net[0].weight[1, 3] = float("nan")
    with pytest.raises(tc.NumericError, match=r"'0\.weight'"):
        tc.freeze_(net)


@pytest.mark.hf
def test_qat_stage_with_gguf_type_trains_and_freezes_to_gguf_linear():
    from transformers import LlamaForCausalLM

    from tests.tiny import tiny_config
    from torchcompress.calibration import CalibrationSet
    from torchcompress.recipe import compress, parse_recipe

    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_config(hidden_size=64, intermediate_size=96, num_hidden_layers=2)).eval()
    ids = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(0))
    report = compress(m, parse_recipe("""
name: t
stages:
  - kind: qat
    qtype: Q4_0
    steps: 3
    lr: 1.0e-3
    batch_size: 4
"""), CalibrationSet(ids, torch.ones_like(ids)))
    gl = {n: mod for n, mod in m.named_modules() if isinstance(mod, GGUFLinear)}
    assert len(gl) == 14 and all(mod.qtype is GGMLType.Q4_0 for mod in gl.values()) and not m.training
    assert not any(isinstance(mod, GGUFQATLinear) for mod in m.modules()) and type(m.lm_head) is nn.Linear
    assert sorted(r.module for r in report.layers) == sorted(gl)
    assert all(r.sqnr_db is not None and 4 < r.bits_per_weight < 5 for r in report.layers)  # Q4_0: 4.5 bits
