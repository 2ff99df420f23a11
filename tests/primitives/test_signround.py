"""Sign-gradient rounding's math: RTN at the start, packed codes = fake-quant codes, and the
optimiser step against a naive sign-SGD written here (loops over groups, no shared helpers)."""

from __future__ import annotations

import pytest
import torch

from torchcompress.config import QuantScheme
from torchcompress.errors import ConfigError
from torchcompress.primitives.affine import dequantize_affine, quantize_affine
from torchcompress.primitives.signround import SignSGD, fake_quant, init_params, quantize_signround

SCHEMES = [QuantScheme(bits=4, group_size=32, symmetric=False), QuantScheme(bits=4, group_size=32, symmetric=True),
           QuantScheme(bits=3, group_size=40, symmetric=False), QuantScheme(bits=4, granularity="channel", symmetric=False)]
IDS = ["asym-g32", "sym-g32", "w3-asym-g40-partial", "asym-channel"]


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_initial_parameters_are_round_to_nearest(scheme):
    torch.manual_seed(0)
    w = torch.randn(24, 100)
    w[3] = 0.0  # an all-zero row
    w[5, :40] *= 1e-6  # tiny groups
    q_rtn = quantize_affine(w, scheme)
    p = init_params(w, scheme)
    q = quantize_signround(w, p, scheme)
    assert torch.equal(q.codes, q_rtn.codes) and torch.equal(q.scale, q_rtn.scale)
    assert (q.zero is None) == (q_rtn.zero is None) and (q.zero is None or torch.equal(q.zero, q_rtn.zero))
    assert torch.equal(fake_quant(w, p, scheme), dequantize_affine(q_rtn.codes, q_rtn.scale, q_rtn.zero, scheme.bits,
                                                                   q_rtn.group_size))


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_packed_codes_equal_the_fake_quant(scheme):
    """Random (in-range) offsets and clip factors: dequantize(pack) is the fake-quantized weight, bit for bit."""
    torch.manual_seed(1)
    w = torch.randn(16, 100)
    p = init_params(w, scheme)
    p.v.uniform_(-0.5, 0.5)
    p.hi.uniform_(0.5, 1.0)
    if p.lo is not None:
        p.lo.uniform_(0.5, 1.0)
    q = quantize_signround(w, p, scheme)
    w_hat = fake_quant(w, p, scheme)
    assert torch.equal(dequantize_affine(q.codes, q.scale, q.zero, scheme.bits, q.group_size), w_hat)
    assert not torch.equal(q.codes, quantize_affine(w, scheme).codes)  # the offsets did change codes
    assert int(q.codes.max()) <= (1 << scheme.bits) - 1


def _naive_fake_quant(w, v, hi, lo, bits, gs, sym):
    """The formula written out group by group (straight-through round)."""
    n, k = w.shape
    cols = []
    for g0 in range(0, k, gs):
        wg, vg = w[:, g0:g0 + gs], v[:, g0:g0 + gs]
        j = g0 // gs
        if sym:
            s = (wg.abs().max(dim=1).values * hi[:, j] / (2 ** (bits - 1) - 1)).half().float()[:, None]
            x = wg / s + vg
            c = torch.clamp(x + (torch.round(x) - x).detach(), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
            cols.append(c * s)
        else:
            mn = torch.clamp(wg.min(dim=1).values, max=0) * lo[:, j]
            mx = torch.clamp(wg.max(dim=1).values, min=0) * hi[:, j]
            s = ((mx - mn) / (2 ** bits - 1)).half().float()
            zr = -mn / s
            z = torch.clamp(zr + (torch.round(zr) - zr).detach(), 0, 2 ** bits - 1)[:, None]
            x = wg / s[:, None] + vg
            c = torch.clamp(x + (torch.round(x) - x).detach() + z, 0, 2 ** bits - 1)
            cols.append((c - z) * s[:, None])
    return torch.cat(cols, dim=1)


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_optimiser_equals_naive_sign_sgd_on_one_linear(sym):
    """k steps of SignSGD on ||x W_hat^T - x W^T||^2 give the same V and clip factors as a naive loop."""
    torch.manual_seed(2)
    bits, gs, iters, lr, k = 4, 32, 10, 0.05, 6
    w, x = torch.randn(12, 64), torch.randn(40, 64)
    y = x @ w.T
    scheme = QuantScheme(bits=bits, group_size=gs, symmetric=sym)
    p = init_params(w, scheme)
    opt = SignSGD(p.tensors(), p.bounds(), lr, iters)
    for _ in range(k):
        ps = [t.requires_grad_(True) for t in p.tensors()]
        loss = ((x @ fake_quant(w, p, scheme).T - y) ** 2).mean()
        opt.step(torch.autograd.grad(loss, ps))
    # the naive loop
    v = torch.zeros(12, 64, requires_grad=True)
    hi = torch.ones(12, 2, requires_grad=True)
    lo = torch.ones(12, 2, requires_grad=True)
    for t in range(k):
        loss = ((x @ _naive_fake_quant(w, v, hi, lo, bits, gs, sym).T - y) ** 2).mean()
        loss.backward()
        step = lr * (1 - t / iters)
        with torch.no_grad():
            for prm, (a, b) in ((v, (-0.5, 0.5)), (hi, (0.5, 1.0)), (lo, (0.5, 1.0))):
                if prm.grad is not None:
                    prm -= step * torch.sign(prm.grad)
                    prm.clamp_(a, b)
                    prm.grad = None
    assert not torch.equal(v.detach(), torch.zeros_like(v))  # it moved
    # the naive formula orders the same float ops: identical gradients, identical signs
    assert torch.equal(p.v, v.detach())
    assert torch.equal(p.hi, hi.detach())
    if not sym:
        assert torch.equal(p.lo, lo.detach())
    assert float(p.v.detach().abs().max()) <= 0.5 and float(p.hi.detach().min()) >= 0.5


def test_linear_decay_and_clamp():
    t = torch.zeros(3)
    opt = SignSGD([t], [(-0.5, 0.5)], 0.3, 4)
    for _ in range(4):
        opt.step([torch.tensor([1.0, -1.0, 0.0])])
    # steps 0.3, 0.225, 0.15, 0.075 (sum 0.75) clamped at 0.5; a zero gradient leaves it
    assert torch.equal(t, torch.tensor([-0.5, 0.5, 0.0]))
    assert opt.current_lr() == 0.0


def test_tensor_granularity_and_float_zero_are_refused():
    from torchcompress.quant.autoround_config import AutoRoundConfig

    with pytest.raises(ConfigError, match="granularity"):
        AutoRoundConfig(QuantScheme(granularity="tensor"))
    with pytest.raises(ConfigError, match="float_zero"):
        AutoRoundConfig(QuantScheme(symmetric=False, float_zero=True))
    with pytest.raises(ConfigError, match="iters"):
        AutoRoundConfig(iters=-1)
    with pytest.raises(ConfigError, match="lr"):
        AutoRoundConfig(lr=0)
    with pytest.raises(ConfigError, match="batch_size"):
        AutoRoundConfig(batch_size=0)
