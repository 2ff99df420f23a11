"""Native CPU GGUF Q4_0 / Q8_0 kernels of ``torchcompress::gguf_linear`` against its reference
(ggml blocks dequantized by primitives.gguf_blocks, then F.linear). Measured fp32 error against an fp64
product of the same dequantized weights: <= 1e-6 of max|y|; tolerances as in test_int_linear_native."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from torchcompress.ops import native
from torchcompress.ops.fastpath import gguf_linear_fast
from torchcompress.ops.gguf_linear import dequantize_rows
from torchcompress.primitives.gguf_blocks import quantize
from torchcompress.primitives.gguf_common import GGMLType

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


@pytest.fixture(scope="module")
def ext():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH: the native extension cannot be built here")
    mod = native.load_native()
    assert mod is not None
    return mod


def _reference(x, blocks, bias, qtype, k):
    w = dequantize_rows(blocks, int(qtype), k, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q8_0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gguf_kernels_match_reference(ext, qtype, dtype):
    rtol, atol = TOL[dtype]
    for i, (n, k) in enumerate([(1, 32), (17, 96), (40, 576), (3, 160)]):
        blocks = quantize(torch.randn(n, k), qtype)
        bias = torch.randn(n) if i % 2 else None
        for m in ((1, 9), (2, 17), (8, 32), (5, 3))[i]:
            x = torch.randn(m, k).to(dtype)
            ref = _reference(x, blocks, bias, qtype, k)
            for isa in ext.available_isas():
                got = ext.gguf_linear(x, blocks, bias, int(qtype), k, isa)
                assert got.dtype == ref.dtype and got.shape == ref.shape
                torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol * ref.float().abs().max().item(),
                                           msg=lambda s: f"{qtype.name} {isa} n={n} k={k} m={m}: {s}")


def test_gguf_op_dispatch(ext, monkeypatch):
    blocks = quantize(torch.randn(24, 128), GGMLType.Q4_0)
    x = torch.randn(2, 3, 128)
    fast = gguf_linear_fast(x, blocks, None, int(GGMLType.Q4_0), 128)
    assert fast is not None and fast.shape == (2, 3, 24)
    y = torch.ops.torchcompress.gguf_linear(x, blocks, None, int(GGMLType.Q4_0), 128)
    torch.testing.assert_close(y, fast, rtol=0, atol=0)
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")
    y_ref = torch.ops.torchcompress.gguf_linear(x, blocks, None, int(GGMLType.Q4_0), 128)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    # other block types and prefill-sized batches stay on the reference
    assert gguf_linear_fast(x, quantize(torch.randn(24, 256), GGMLType.Q4_K), None, int(GGMLType.Q4_K), 256) is None
    assert gguf_linear_fast(torch.randn(64, 128), blocks, None, int(GGMLType.Q4_0), 128) is None


def test_gguf_bad_arguments(ext):
    blocks = quantize(torch.randn(4, 64), GGMLType.Q8_0)
    with pytest.raises(RuntimeError, match="blocks must be"):
        ext.gguf_linear(torch.randn(1, 64), blocks[:, :-1], None, int(GGMLType.Q8_0), 64)
    with pytest.raises(RuntimeError, match="Q4_0"):
        ext.gguf_linear(torch.randn(1, 64), blocks, None, 12, 64)
