"""GPTQLinear (act-order g_idx): forward = F.linear with the dequantized weight; save/load round trip."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchcompress.config import QuantScheme
from torchcompress.nn.gptq_linear import GPTQLinear, module_from_gptq
from torchcompress.nn.quant_linear import QuantLinear
from torchcompress.primitives.gptq import accumulate_hessian, gptq_quantize


def _layer(act_order, k=96, n=40, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    x = torch.randn(256, k) @ torch.randn(k, k) / k ** 0.5
    h = accumulate_hessian(torch.zeros(k, k, dtype=torch.float64), x) * (2 / 256)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    res = gptq_quantize(lin.weight.detach(), h, scheme, act_order=act_order)
    return lin, res, module_from_gptq(lin, res, scheme), x


def test_act_order_gives_gptq_linear_and_forward_matches():
    lin, res, mod, x = _layer(True)
    assert type(mod) is GPTQLinear
    assert torch.equal(mod.dequantize(), res.dequantize())
    torch.testing.assert_close(mod(x), F.linear(x, res.dequantize(), lin.bias), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    mod(x).sum().backward()
    torch.testing.assert_close(x.grad, res.dequantize().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_without_act_order_plain_quant_linear():
    lin, res, mod, x = _layer(False, bias=False)
    assert type(mod) is QuantLinear
    assert torch.equal(mod.dequantize(), res.dequantize())


def test_save_load_round_trip(tmp_path):
    from torchcompress.formats.checkpoint import load_compressed, save_compressed

    lin, res, mod, x = _layer(True)
    model = nn.Sequential(nn.Linear(96, 96), mod)
    save_compressed(model, tmp_path / "m")
    skeleton = nn.Sequential(nn.Linear(96, 96), nn.Linear(96, 40))
    back = load_compressed(tmp_path / "m", skeleton.to("meta"))
    assert type(back[1]) is GPTQLinear
    assert torch.equal(back[1].g_idx, mod.g_idx)
    assert torch.equal(back(x), model(x))


def test_compiles():
    lin, res, mod, x = _layer(True)
    out = torch.compile(mod, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(out, mod(x))
