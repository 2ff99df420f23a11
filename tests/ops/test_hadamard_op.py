"""The online Hadamard op on every device available (CPU always, CUDA when present), against a dense product."""

import math

import pytest
import torch

from torchcompress.ops.hadamard import hadamard_transform
from torchcompress.primitives.hadamard import hadamard_matrix

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [64, 576, 1536, 8192 + 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_op_equals_dense(device, n, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, 3, n, generator=g).to(dtype)
    want = x.double() @ hadamard_matrix(n).double() / math.sqrt(n)
    got = hadamard_transform(x.to(device))
    assert got.dtype == dtype and got.device.type == device
    # measured max error on the CPU: float32 1.2e-6 (n=576), bf16 1.5e-2 (the result rounded to 8 bits)
    atol = 5e-6 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_hadamard_op_is_orthogonal_and_compiles(device):
    x = torch.randn(4, 1536, device=device)
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    if device == "cuda":
        torch.testing.assert_close(torch.compile(hadamard_transform)(x), y, rtol=0, atol=1e-5)
