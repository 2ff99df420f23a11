"""FP8 W8A8: which path runs (a pure function of the device's capability, tested here for every
branch), and the ``torch._scaled_mm`` path against the reference (torch's CPU ``_scaled_mm`` here;
the same comparison on an FP8 GPU is gpu-marked)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from torchcompress.nn.scheme_linear import FP8Linear
from torchcompress.ops.backend import Backend
from torchcompress.ops.scheme_linear import fp8_kernel, fp8_linear, fp8_scaled_mm_rowwise
from torchcompress.quant.scheme_config import FP8Config

AUTO, REF = Backend.AUTO, Backend.REFERENCE


@pytest.mark.parametrize("device,cap,shape,block,dyn,backend,want", [
    ("cuda", (9, 0), (256, 512), None, True, AUTO, "scaled_mm_rowwise"),  # Hopper
    ("cuda", (8, 9), (256, 512), None, True, AUTO, "scaled_mm_rowwise"),  # Ada
    ("cuda", (10, 0), (256, 512), None, True, AUTO, "scaled_mm_rowwise"),  # Blackwell
    ("cuda", (8, 6), (256, 512), None, True, AUTO, "reference"),  # Ampere: no FP8 tensor cores
    ("cuda", (8, 0), (256, 512), None, True, AUTO, "reference"),
    ("cpu", None, (256, 512), None, True, AUTO, "reference"),
    ("cuda", (9, 0), (256, 512), (128, 128), True, AUTO, "reference"),  # block scales
    ("cuda", (9, 0), (256, 512), None, False, AUTO, "reference"),  # weight-only FP8
    ("cuda", (9, 0), (250, 512), None, True, AUTO, "reference"),  # N not a multiple of 16
    ("cuda", (9, 0), (256, 520), None, True, AUTO, "reference"),  # K not a multiple of 16
    ("cuda", (9, 0), (256, 512), None, True, REF, "reference"),  # TORCHCOMPRESS_KERNEL=reference
])
def test_path_choice(device, cap, shape, block, dyn, backend, want):
    assert fp8_kernel(device, cap, shape, block, dyn, backend) == want


def _check(m: FP8Linear, x: torch.Tensor):
    ref = fp8_linear(x, m.weight, m.weight_scale, m.bias, None, True).float()  # reference (not CUDA >= 8.9)
    got = fp8_scaled_mm_rowwise(x, m.weight, m.weight_scale, m.bias).float()
    assert got.shape == ref.shape
    # measured on CPU (bf16 and fp32 x, batches 1/64/300): <= 6.8e-3 of max|y| (the GEMM's bf16
    # output and the bias added in bf16); a wrong scale or transposed weight is off by O(1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scaled_mm_math_matches_reference_on_cpu(dtype):
    torch.manual_seed(0)
    m = FP8Linear.from_linear(nn.Linear(512, 256), FP8Config())
    _check(m, torch.randn(64, 512).to(dtype))
    _check(m, torch.randn(2, 3, 512).to(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a GPU with FP8 (compute capability >= 8.9)")
def test_scaled_mm_on_gpu_matches_reference(monkeypatch):
    torch.manual_seed(0)
    m = FP8Linear.from_linear(nn.Linear(512, 256), FP8Config()).cuda()
    assert fp8_kernel("cuda", torch.cuda.get_device_capability(), (256, 512), None, True, AUTO) == "scaled_mm_rowwise"
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    fast = m(x).float()
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")
    ref = m(x).float()
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-2 * ref.abs().max().item())  # as measured on CPU above
