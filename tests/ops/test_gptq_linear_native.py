"""GPTQ-packed act-order weights (``g_idx``) through the int_linear kernels, against the g_idx reference.

The act-order path permutes the columns of the codes once so that groups are contiguous and the
columns of x alike on every call (primitives/act_order.py). Proof that this is the same math: the
permuted layout's dequantized weight is bit-identical to the reference's dequantized weight with its
columns permuted; then the products are checked like every other kernel (fp32 1e-5 of max|y|, as in
test_int_linear_native), on every instruction set and both paths.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchcompress.config import QuantScheme
from torchcompress.nn.gptq_linear import GPTQLinear, module_from_gptq
from torchcompress.ops import native
from torchcompress.ops.fastpath import gptq_linear_fast
from torchcompress.ops.gptq_linear import dequantize_g_idx_packed
from torchcompress.primitives.act_order import sequential_group_size, sort_by_group
from torchcompress.primitives.affine import dequantize_affine, quantize_affine
from torchcompress.primitives.gptq import accumulate_hessian, gptq_quantize
from torchcompress.primitives.packing import pack, unpack

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


@pytest.fixture(scope="module")
def ext():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH: the native extension cannot be built here")
    mod = native.load_native()
    assert mod is not None
    return mod


def _act_order(n, k, bits, gs, sym, seed):
    """Random codes/scales and an act-order g_idx: the groups of a random column order."""
    g = torch.Generator().manual_seed(seed)
    q = quantize_affine(torch.randn(n, k, generator=g), QuantScheme(bits=bits, group_size=gs, symmetric=sym))
    order = torch.randperm(k, generator=g)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    return pack(q.codes, bits), q.scale, q.zero, g_idx


def _ref(x, qw, scale, zero, g_idx, bias, bits, k):
    w = dequantize_g_idx_packed(qw, scale, zero, g_idx, bits, k, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# (N, K, group_size): partial last group (K=100 g32), one group, odd N, K=576 g128
SHAPES = [(5, 100, 32), (1, 64, 64), (17, 576, 128), (40, 256, 64)]


@pytest.mark.parametrize("bits", [4, 8])
def test_sorted_layout_is_the_same_weight(bits):
    for i, (n, k, gs) in enumerate(SHAPES):
        qw, scale, zero, g_idx = _act_order(n, k, bits, gs, i % 2 == 0, i)
        lay = sort_by_group(qw, g_idx, bits, k, scale.shape[1])
        assert lay is not None and lay.group_size == gs
        w_ref = dequantize_g_idx_packed(qw, scale, zero, g_idx, bits, k, torch.float32)
        w_sorted = dequantize_affine(unpack(lay.qweight, bits, k), scale, zero, bits, gs, torch.float32)
        assert torch.equal(w_sorted, w_ref[:, lay.perm])


def test_non_uniform_groups_stay_on_reference():
    k = 64
    qw, scale, zero, _ = _act_order(4, k, 4, 16, False, 0)
    g_idx = torch.randint(0, 4, (k,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    assert sort_by_group(qw, g_idx, 4, k, 4) is None  # groups of unequal sizes
    assert gptq_linear_fast(torch.randn(2, k), qw, scale, zero, g_idx, None, 4, k, None, None) is None
    assert sequential_group_size(torch.arange(k, dtype=torch.int32) // 16, k, 4) == 16


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_act_order_kernels_match_reference(ext, bits, dtype):
    rtol, atol = TOL[dtype]
    batches = (1, 3, 8, 17, 33, 64)
    for i, (n, k, gs) in enumerate(SHAPES):
        qw, scale, zero, g_idx = _act_order(n, k, bits, gs, i % 2 == 1, 10 + i)
        lay = sort_by_group(qw, g_idx, bits, k, scale.shape[1])
        bias = torch.randn(n) if i % 2 else None
        for m in (batches[i], batches[i + 2]):
            x = torch.randn(m, k).to(dtype)
            ref = _ref(x, qw, scale, zero, g_idx, bias, bits, k)
            xp = x.index_select(-1, lay.perm)
            for isa in ext.available_isas():
                for path in ("gemv", "tiled"):
                    got = ext.int_linear(xp, lay.qweight, scale, zero, bias, bits, gs, k, isa, path)
                    torch.testing.assert_close(got.float(), ref.float(), rtol=rtol,
                                               atol=atol * max(ref.float().abs().max().item(), 1e-6),
                                               msg=lambda s: f"bits={bits} {isa} {path} ({n},{k},g{gs}) m={m}: {s}")
            fast = gptq_linear_fast(x, qw, scale, zero, g_idx, bias, bits, k, lay.perm, lay.qweight)
            assert fast is not None
            torch.testing.assert_close(fast.float(), ref.float(), rtol=rtol, atol=atol * ref.float().abs().max().item())


def _gptq_module(k=192, n=24, act_order=True):
    lin = nn.Linear(k, n)
    x = torch.randn(256, k) @ torch.randn(k, k) / k ** 0.5
    h = accumulate_hessian(torch.zeros(k, k, dtype=torch.float64), x) * (2 / 256)
    scheme = QuantScheme(bits=4, group_size=64, symmetric=False)
    res = gptq_quantize(lin.weight.detach(), h, scheme, act_order=act_order)
    return module_from_gptq(lin, res, scheme), x[:9]


def test_gptq_linear_module_uses_sorted_layout(ext, monkeypatch):
    mod, x = _gptq_module()
    assert type(mod) is GPTQLinear
    assert sequential_group_size(mod.g_idx, mod.in_features, mod.scale.shape[1]) is None  # really act-order
    y = mod(x)
    lay = mod._sorted_layout()
    assert lay is not None and mod._sorted_layout() is lay  # cached
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")
    y_ref = mod(x)
    monkeypatch.delenv("TORCHCOMPRESS_KERNEL")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    with torch.no_grad():  # an in-place change of the codes invalidates the cached layout
        mod.qweight.copy_(mod.qweight.flip(1))
    assert mod._sorted_layout() is not lay
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")
    y_ref2 = mod(x)
    monkeypatch.delenv("TORCHCOMPRESS_KERNEL")
    torch.testing.assert_close(mod(x), y_ref2, rtol=1e-5, atol=1e-5 * y_ref2.abs().max().item())


def test_sequential_g_idx_uses_int_kernels_directly(ext):
    k, n, gs = 128, 16, 32
    qw, scale, zero, _ = _act_order(n, k, 4, gs, False, 3)
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    x = torch.randn(4, k)
    fast = gptq_linear_fast(x, qw, scale, zero, g_idx, None, 4, k, None, None)
    assert fast is not None
    ref = _ref(x, qw, scale, zero, g_idx, None, 4, k)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_gptq_linear_forward_does_not_read_tensors_back_each_call(ext, monkeypatch):
    # issue 20 item 8: act-order (and sequential-g_idx GPTQLinear) layers computed int((g_idx == 0).sum()) and
    # torch.equal on every forward: a device sync that CUDA graphs cannot capture. Now the kernel layout and
    # group size are computed once (pack/load time) and cached; a forward must not turn a tensor into a number.
    act, x = _gptq_module()
    seq, _ = _gptq_module(act_order=False)
    seq = GPTQLinear.from_gptq(torch.nn.Linear(seq.in_features, seq.out_features), type("R", (), {
        "codes": unpack(seq.qweight, 4, seq.in_features), "scale": seq.scale, "zero": seq.zero,
        "g_idx": torch.arange(seq.in_features, dtype=torch.int32) // 64}), seq.scheme)  # trivial g_idx, as load_gptq builds
    want = [m(x) for m in (act, seq)]

    def no_readback(*a, **k):
        raise AssertionError("a tensor was read back to the host during forward")

    monkeypatch.setattr(torch.Tensor, "__int__", no_readback)
    monkeypatch.setattr(torch.Tensor, "item", no_readback)
    monkeypatch.setattr(torch, "equal", no_readback)
    for m, y in zip((act, seq), want):
        with torch.no_grad():
            torch.testing.assert_close(m(x), y, rtol=0, atol=0)
        torch.testing.assert_close(m(x), y, rtol=0, atol=0)  # through the dispatcher (grad mode)
