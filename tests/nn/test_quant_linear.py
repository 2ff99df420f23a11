"""QuantLinear: packed forward vs the dequantized reference, autograd through the custom op, QAT
(fake-quant + STE), freeze/unfreeze, and a partial last group end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchcompress as tc
from torchcompress import QuantLinear, QuantScheme
from torchcompress.errors import ConfigError, NumericError
from torchcompress.ops.backend import Backend
from torchcompress.primitives.affine import fake_quantize, quantize_affine
from torchcompress.primitives.packing import pack, packed_len

TOL = {  # (rtol, atol) against an fp32 reference, per input dtype
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

KERNELS = [b.value for b in Backend]  # "auto" and "reference"

GRANS = {
    "tensor": dict(granularity="tensor"),
    "channel": dict(granularity="channel"),
    "g16": dict(granularity="group", group_size=16),
}


def make_ql(in_f=40, out_f=24, bias=True, **scheme_kw) -> tuple[nn.Linear, QuantLinear]:
    lin = nn.Linear(in_f, out_f, bias=bias)
    if bias:
        with torch.no_grad():
            lin.bias.normal_()  # default init is tiny; make the bias matter
    return lin, QuantLinear.from_linear(lin, QuantScheme(**scheme_kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gran", list(GRANS))
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_forward_matches_dequantized_linear(bits, gran, symmetric, bias, dtype, monkeypatch):
    # in_features=40 is not a multiple of 16: partial last group; 3-D input (B, T, K)
    _, ql = make_ql(40, 24, bias, bits=bits, symmetric=symmetric, **GRANS[gran])
    assert ql.is_packed
    x = torch.randn(2, 3, 40)
    ref = F.linear(x, ql.dequantize(torch.float32), ql.bias).detach()
    rtol, atol = TOL[dtype]
    # every kernel the machine offers (auto: the fast path where one applies) against the reference
    for kernel in KERNELS:
        monkeypatch.setenv("TORCHCOMPRESS_KERNEL", kernel)
        with torch.no_grad():
            y = ql(x.to(dtype))
        assert y.shape == (2, 3, 24) and y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=atol * float(ref.abs().max()), msg=kernel)
        if kernel == "reference" and dtype == torch.float32:
            # the reference is literally the dequantized linear
            assert torch.equal(y, F.linear(x, ql.dequantize(dtype), ql.bias))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_dequantize_is_rtn_of_original_weight(bits, symmetric):
    lin, ql = make_ql(40, 24, bits=bits, group_size=16, symmetric=symmetric)
    expected = fake_quantize(lin.weight.detach(), ql.scheme)
    assert torch.equal(ql.dequantize(torch.float32), expected)
    q = quantize_affine(lin.weight.detach(), ql.scheme)
    assert torch.equal(ql.qweight, pack(q.codes, bits))
    assert ql.qweight.shape == (24, packed_len(40, bits))
    assert torch.equal(ql.scale, q.scale)


def test_state_dict_is_plain_tensors():
    _, ql = make_ql(40, 24, bits=4, group_size=16, symmetric=False)
    sd = ql.state_dict()
    assert set(sd) == {"qweight", "scale", "zero", "bias"}
    assert sd["qweight"].dtype == torch.uint8 and sd["zero"].dtype == torch.uint8
    assert sd["scale"].dtype == torch.float16 and sd["scale"].shape == (24, 3)
    _, ql = make_ql(40, 24, bias=False, bits=8, granularity="channel")
    assert set(ql.state_dict()) == {"qweight", "scale"}
    assert [n for n, _ in ql.named_parameters()] == []


def test_from_linear_copies_bias_and_does_not_alias():
    lin, ql = make_ql(16, 8, bits=4, group_size=8)
    assert torch.equal(ql.bias, lin.bias)
    y0 = ql(torch.ones(1, 16))
    with torch.no_grad():
        lin.weight.add_(1.0)
        lin.bias.add_(1.0)
    assert torch.equal(ql(torch.ones(1, 16)), y0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_input_gradient_through_custom_op(symmetric, bias, dtype):
    _, ql = make_ql(40, 24, bias, bits=4, group_size=16, symmetric=symmetric)
    x = torch.randn(2, 5, 40, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 5, 24, dtype=dtype)
    ql(x).backward(g)

    x2 = x.detach().float().requires_grad_(True)
    w = ql.dequantize(torch.float32)
    b2 = ql.bias.detach().clone().requires_grad_(True) if bias else None
    F.linear(x2, w, b2).backward(g.float())
    rtol, atol = TOL[dtype]
    assert x.grad is not None and x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), x2.grad, rtol=rtol, atol=atol * float(x2.grad.abs().max()))
    if bias:
        assert ql.bias.grad is not None
        torch.testing.assert_close(ql.bias.grad.float(), b2.grad, rtol=rtol, atol=atol * float(b2.grad.abs().max()))
    # the packed tensors are buffers: nothing to train there
    assert not ql.qweight.requires_grad and not ql.scale.requires_grad


def test_opcheck_int_linear():
    op = torch.ops.torchcompress.int_linear.default
    # asymmetric with bias, 2-D input; symmetric per-tensor 3-bit without bias, 3-D input
    _, ql = make_ql(40, 24, True, bits=4, group_size=16, symmetric=False)
    torch.library.opcheck(op, (torch.randn(3, 40, requires_grad=True), ql.qweight, ql.scale, ql.zero, ql.bias, 4, 16, 40))
    _, ql = make_ql(24, 8, False, bits=3, granularity="tensor")
    x = torch.randn(2, 4, 24, requires_grad=True)
    torch.library.opcheck(op, (x, ql.qweight, ql.scale, None, None, 3, 24, 24))


def test_fake_kernel_shape_on_meta():
    _, ql = make_ql(40, 24, bits=4, group_size=16)
    ql_meta = QuantLinear(40, 24, True, ql.scheme, device="meta")
    y = ql_meta(torch.empty(2, 7, 40, device="meta"))
    assert y.shape == (2, 7, 24) and y.is_meta


def test_kernel_env_var(monkeypatch):
    _, ql = make_ql(40, 24, bits=4, group_size=16)
    x = torch.randn(3, 40)
    y = ql(x)
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")
    assert torch.equal(ql(x), F.linear(x, ql.dequantize(), ql.bias))
    torch.testing.assert_close(ql(x), y, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", " Reference ")  # case and spaces do not matter
    torch.testing.assert_close(ql(x), y, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "bogus")
    with pytest.raises(ConfigError) as ei:
        ql(x)
    assert "TORCHCOMPRESS_KERNEL" in str(ei.value)


def test_weight_bits_counts_codes_scales_zeros():
    _, ql = make_ql(576, 64, bits=4, group_size=128, symmetric=False)
    # 576*4 bits of codes per row, 5 fp16 scales and 5 uint8 zeros per row
    assert ql.weight_bits() == 64 * (576 * 4 + 5 * 16 + 5 * 8)
    _, ql8 = make_ql(576, 64, bits=8, granularity="channel")
    assert ql8.weight_bits() == 64 * (576 * 8 + 16)
    assert "bits=4" in repr(ql) and "packed" in repr(ql)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("qat", [False, True])
def test_from_linear_rejects_nan_inf_with_name(bad, qat):
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[1, 2] = bad
    with pytest.raises(NumericError) as ei:
        QuantLinear.from_linear(lin, QuantScheme(bits=4, group_size=4), qat=qat, name="blocks.0.fc.weight")
    assert "blocks.0.fc.weight" in str(ei.value)


# ---------------------------------------------------------------------------------------------
# QAT
# ---------------------------------------------------------------------------------------------


def test_qat_forward_is_fake_quant_and_ste_gradient_reaches_master_weight():
    lin = nn.Linear(40, 24)
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False)
    ql = QuantLinear.from_linear(lin, scheme, qat=True)
    assert not ql.is_packed and isinstance(ql.weight, nn.Parameter) and ql.weight.requires_grad
    assert torch.equal(ql.weight, lin.weight)
    x = torch.randn(6, 40)
    g = torch.randn(6, 24)
    y = ql(x)
    w_hat = fake_quantize(lin.weight.detach(), scheme)
    assert torch.equal(y, F.linear(x, w_hat, ql.bias))
    assert torch.equal(ql.dequantize(), w_hat)
    y.backward(g)
    # straight-through: dL/dw = dL/dw_hat = g^T x (nothing is clipped with RTN scales)
    torch.testing.assert_close(ql.weight.grad, g.t() @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ql.bias.grad, g.sum(0), rtol=1e-5, atol=1e-5)


def test_ste_zero_gradient_where_codes_saturate():
    # an fp16 scale cannot exceed 65504: a weight of 1e6 with 4 bits saturates (7 * 65504 < 1e6)
    lin = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.5)
        lin.weight[0, 3] = 1e6
    ql = QuantLinear.from_linear(lin, QuantScheme(bits=4, granularity="channel"), qat=True)
    ql(torch.ones(1, 8)).sum().backward()
    grad = ql.weight.grad
    assert grad[0, 3] == 0  # clipped
    assert (grad[1] != 0).all()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_qat_training_reduces_loss(opt_name):
    torch.manual_seed(0)
    teacher = nn.Linear(32, 8)
    x = torch.randn(256, 32)
    y = teacher(x).detach()
    student = QuantLinear.from_linear(nn.Linear(32, 8), QuantScheme(bits=4, group_size=16), qat=True)
    opt = (torch.optim.SGD(student.parameters(), lr=0.1) if opt_name == "sgd"
           else torch.optim.Adam(student.parameters(), lr=1e-2))
    with torch.no_grad():
        loss0 = float(F.mse_loss(student(x), y))
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(student(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss1 = float(F.mse_loss(student(x), y))
    assert loss1 < 0.3 * loss0, (loss0, loss1)
    # and the packed model keeps the trained behaviour
    with torch.no_grad():
        fake = student(x)
        student.freeze()
        torch.testing.assert_close(student(x), fake, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,gran", [(4, "g16"), (3, "channel"), (8, "tensor"), (5, "g16")])
def test_freeze_packs_and_matches_fake_quant_forward(bits, gran, symmetric):
    lin = nn.Linear(40, 24)
    ql = QuantLinear.from_linear(lin, QuantScheme(bits=bits, symmetric=symmetric, **GRANS[gran]), qat=True)
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        y_fake = ql(x)
    assert ql.freeze() is ql
    assert ql.is_packed and ql.weight is None
    assert ql.qweight.dtype == torch.uint8 and ql.qweight.shape == (24, packed_len(40, bits))
    assert (ql.zero is None) == symmetric
    assert [n for n, _ in ql.named_parameters()] == ["bias"]
    with torch.no_grad():
        y_packed = ql(x)
    torch.testing.assert_close(y_packed, y_fake, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ql.dequantize(), fake_quantize(lin.weight.detach(), ql.scheme), rtol=0, atol=0)
    # the packed layer equals an RTN from_linear of the same master weight
    direct = QuantLinear.from_linear(lin, ql.scheme)
    assert torch.equal(ql.qweight, direct.qweight) and torch.equal(ql.scale, direct.scale)
    ql.freeze()  # no-op when packed
    with torch.no_grad():
        assert torch.equal(ql(x), y_packed)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_unfreeze_gives_trainable_dequantized_master(symmetric):
    _, ql = make_ql(40, 24, bits=4, group_size=16, symmetric=symmetric)
    x = torch.randn(5, 40)
    y_packed = ql(x).detach()
    w_hat = ql.dequantize()
    assert ql.unfreeze() is ql
    assert not ql.is_packed
    assert isinstance(ql.weight, nn.Parameter) and ql.weight.requires_grad
    assert torch.equal(ql.weight, w_hat)
    assert "qweight" not in dict(ql.named_buffers()) and "scale" not in dict(ql.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(ql(x), y_packed, rtol=1e-2, atol=1e-2 * float(y_packed.abs().max()))
    ql(x).sum().backward()
    assert ql.weight.grad is not None
    ql.freeze()
    assert ql.is_packed and (ql.zero is None) == symmetric
    torch.testing.assert_close(ql(x), y_packed, rtol=1e-2, atol=1e-2 * float(y_packed.abs().max()))


def test_unfreeze_then_freeze_is_exact_for_symmetric():
    # re-quantizing a symmetric RTN grid reproduces it (the group max maps to the same scale)
    _, ql = make_ql(40, 24, bits=4, group_size=16, symmetric=True)
    q0, s0 = ql.qweight.clone(), ql.scale.clone()
    ql.unfreeze().freeze()
    assert torch.equal(ql.qweight, q0) and torch.equal(ql.scale, s0)


# ---------------------------------------------------------------------------------------------
# a partial last group end to end: 576 = 4 * 128 + 64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_partial_last_group_quantize_pack_forward_save_load(tmp_path, symmetric):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(576, 96), nn.ReLU(), nn.Linear(96, 576))
    x = torch.randn(4, 576)
    ref = model(x).detach()
    tc.quantize_(model, QuantScheme(bits=4, group_size=128, symmetric=symmetric))
    ql = model[0]
    assert isinstance(ql, QuantLinear) and isinstance(model[2], QuantLinear)
    assert ql.scale.shape == (96, 5) and ql.group_size == 128
    assert ql.qweight.shape == (96, 288)
    with torch.no_grad():
        y = model(x)
    # compared with the float model: int4 g128 keeps the output close
    rel = float((y - ref).norm() / ref.norm())
    assert rel < 0.2, rel
    # the last (64-wide) group carries its own scale, from its own 64 weights
    lin0 = nn.Linear(576, 96)
    with torch.no_grad():
        lin0.weight[:, 512:] *= 0.05
    small_tail = QuantLinear.from_linear(lin0, ql.scheme)
    assert float(small_tail.scale[:, 4].float().max()) < 0.2 * float(small_tail.scale[:, :4].float().min())
    if symmetric:
        assert torch.equal(small_tail.scale[:, 4], (lin0.weight[:, 512:].abs().amax(1) / 7).half())
    tc.save_compressed(model, tmp_path / "ckpt")
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(576, 96), nn.ReLU(), nn.Linear(96, 576))
    loaded = tc.load_compressed(tmp_path / "ckpt", skeleton)
    assert isinstance(loaded[0], QuantLinear) and loaded[0].scale.shape == (96, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_linear_source(dtype):
    lin = nn.Linear(64, 16).to(dtype)
    ql = QuantLinear.from_linear(lin, QuantScheme(bits=8, granularity="channel"))
    assert ql.bias.dtype == dtype
    x = torch.randn(3, 64, dtype=dtype)
    y = ql(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), lin(x).float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (-1, 4)])
def test_quantlinear_rejects_empty_or_negative_shapes(shape):
    from torchcompress.errors import ConfigError

    with pytest.raises(ConfigError):
        QuantLinear(*shape)
