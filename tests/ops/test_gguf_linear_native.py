"""Native CPU GGUF kernels of ``torchcompress::gguf_linear`` against its reference (ggml blocks
dequantized by primitives.gguf_blocks, then F.linear), on every instruction set this CPU has.

* The kernels' dequantized weights are bit-identical to the reference's (same fp32 operations in
  the same order), so ``gguf_dequantize`` is checked with ``torch.equal``.
* Products: measured fp32 error against an fp64 product of the same weights <= 1e-6 of max|y|;
  tolerances as in test_int_linear_native (fp32 1e-5, bf16/fp16 by their output rounding).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from torchcompress.ops import native
from torchcompress.ops.fastpath import GGUF_CPU_BLOCK, GGUF_GEMV_MAX_BATCH, GGUF_PANEL_MIN_BATCH, gguf_linear_fast
from torchcompress.ops.gguf_linear import dequantize_rows
from torchcompress.primitives.gguf_blocks import quantize
from torchcompress.primitives.gguf_common import GGMLType

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
LEGACY = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0]
KQUANTS = [GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]


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


def _weights(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0, : min(k, 64)] = 0.0  # an all-zero block (d = 0)
    if n > 2:
        w[2] *= 1e-6  # tiny magnitudes
        w[1, 5] = 40.0  # an outlier
    return w


def _shapes(qtype):
    # (N, K, batches): 1 row, odd N, several blocks per row; batches 1..64 (GEMV passes of 8/4/1 rows,
    # panels of 4/1 weight rows and 512-weight chunks times 6..1 rows of x, and the tiled path)
    if qtype in KQUANTS:
        return [(1, 256, (1, 9)), (17, 512, (2, 17)), (40, 768, (8, 33)), (3, 256, (5, 64))]
    return [(1, 32, (1, 9)), (17, 96, (2, 17)), (40, 576, (8, 33)), (3, 160, (5, 64))]


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS, ids=lambda t: t.name)
def test_dequantize_bit_exact(ext, qtype):
    for n, k, _ in _shapes(qtype):
        blocks = quantize(_weights(n, k, n), qtype)
        ref = dequantize_rows(blocks, int(qtype), k, torch.float32)
        for isa in ext.available_isas():
            got = ext.gguf_dequantize(blocks, int(qtype), k, isa)
            assert torch.equal(got, ref), f"{qtype.name} {isa} ({n}, {k}): max diff {(got - ref).abs().max()}"


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gguf_kernels_match_reference(ext, qtype, dtype):
    rtol, atol = TOL[dtype]
    for i, (n, k, batches) in enumerate(_shapes(qtype)):
        blocks = quantize(_weights(n, k, i), qtype)
        bias = torch.randn(n) if i % 2 else None
        for m in batches:
            x = torch.randn(m, k).to(dtype)
            ref = _reference(x, blocks, bias, qtype, k)
            for isa in ext.available_isas():
                for path in ("gemv", "panel", "tiled"):
                    got = ext.gguf_linear(x, blocks, bias, int(qtype), k, isa, path)
                    assert got.dtype == ref.dtype and got.shape == ref.shape
                    torch.testing.assert_close(
                        got.float(), ref.float(), rtol=rtol, atol=atol * max(ref.float().abs().max().item(), 1e-6),
                        msg=lambda s: f"{qtype.name} {isa} {path} n={n} k={k} m={m}: {s}")


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_gguf_op_dispatch(ext, monkeypatch, qtype):
    k = 256
    blocks = quantize(torch.randn(24, k), qtype)
    for x in (torch.randn(2, 3, k), torch.randn(16, k), torch.randn(80, k)):  # GEMV, panel and tiled sizes
        fast = gguf_linear_fast(x, blocks, None, int(qtype), k)
        assert fast is not None and fast.shape == (*x.shape[:-1], 24)
        y = torch.ops.torchcompress.gguf_linear(x, blocks, None, int(qtype), k)
        torch.testing.assert_close(y, fast, rtol=0, atol=0)
        if x.shape[0] == 16 and ext.available_isas()[0] != "portable":  # the op's batch-16 path is the panel kernel
            assert torch.equal(y, ext.gguf_linear(x, blocks, None, int(qtype), k, "auto", "panel"))
        monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")
        y_ref = torch.ops.torchcompress.gguf_linear(x, blocks, None, int(qtype), k)
        monkeypatch.delenv("TORCHCOMPRESS_KERNEL")
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    # types without a native kernel stay on the reference
    assert int(GGMLType.Q2_K) not in GGUF_CPU_BLOCK
    q2 = quantize(torch.randn(4, 256), GGMLType.Q2_K)
    assert gguf_linear_fast(torch.randn(1, 256), q2, None, int(GGMLType.Q2_K), 256) is None


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q6_K], ids=lambda t: t.name)
def test_gguf_auto_path_crossovers(ext, qtype):
    """path='auto' runs the GEMV below panel_min_batch rows of x, the panel kernel up to
    gemv_max_batch, the tiled path above (each path's own result, bit for bit)."""
    k, n = 512, 9
    blocks = quantize(_weights(n, k, 3), qtype)
    for m in (1, 2, 3, 4, 5, 6, 7):
        x = torch.randn(m, k)
        want = "gemv" if m < 3 else "panel" if m <= 5 else "tiled"
        auto = ext.gguf_linear(x, blocks, None, int(qtype), k, "auto", "auto", 5, 3)
        assert torch.equal(auto, ext.gguf_linear(x, blocks, None, int(qtype), k, "auto", want)), (m, want)
    block = GGUF_CPU_BLOCK[int(qtype)]
    for isa in ("avx512", "avx2"):
        assert 1 < GGUF_PANEL_MIN_BATCH[isa][block] <= GGUF_GEMV_MAX_BATCH


def test_gguf_bad_arguments(ext):
    blocks = quantize(torch.randn(4, 64), GGMLType.Q8_0)
    with pytest.raises(RuntimeError, match="blocks must be"):
        ext.gguf_linear(torch.randn(1, 64), blocks[:, :-1], None, int(GGMLType.Q8_0), 64)
    with pytest.raises(RuntimeError, match="Q4_K"):
        ext.gguf_linear(torch.randn(1, 64), blocks, None, int(GGMLType.Q2_K), 64)
    with pytest.raises(RuntimeError, match="multiple of the 256"):
        ext.gguf_linear(torch.randn(1, 64), blocks, None, int(GGMLType.Q4_K), 64)
    with pytest.raises(RuntimeError, match="path must be"):
        ext.gguf_linear(torch.randn(1, 64), blocks, None, int(GGMLType.Q8_0), 64, "auto", "fast")
