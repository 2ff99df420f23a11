"""The Triton kernels of ``torchcompress::int_linear`` against the reference, on CPU under
``TRITON_INTERPRET=1`` (and on CUDA when present).

Shapes exercise every mask: N and K not multiples of the blocks, K < one block, a partial last group,
odd group sizes, widths that do not divide 8 (codes spanning two bytes), split-K partial sums.
The interpreter runs each program in NumPy (about a second per launch here), so the default set is
small and the full matrix is marked slow.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton reads TRITON_INTERPRET when it is first imported: set it before that. Without CUDA every
    # Triton kernel in this process must run interpreted anyway (QUALITY.md), so it stays set.
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton; the [gpu] extra)")

from torchcompress.config import QuantScheme  # noqa: E402
from torchcompress.ops.int_linear import _reference  # noqa: E402
from torchcompress.primitives.affine import quantize_affine  # noqa: E402
from torchcompress.primitives.packing import pack  # noqa: E402


@pytest.fixture(scope="module")
def kernel():
    import importlib

    return importlib.import_module("torchcompress.ops.triton.int_linear")


DEVICE = "cuda" if CUDA else "cpu"

# (N, K, group_size, bits, symmetric, batch, path): every regime (gemv: split-K GEMV, dot: tl.dot
# tiles, dequant: dequantize once + F.linear) on word rows (2/4/8 bits) and byte rows (other widths,
# or groups that split words)
FAST = [
    (17, 256, 32, 4, True, 1, "gemv"),  # words; N off the block; split-K
    (9, 96, 64, 4, False, 3, "gemv"),  # asym g64; the second K slice ends inside a group
    (17, 256, 128, 4, False, 8, "gemv"),  # asym g128, 8 rows in one program
    (33, 264, 128, 4, True, 11, "gemv"),  # 11 rows: two programs along M (8 + 3 masked), K tail of a group
    (5, 48, 48, 2, False, 2, "gemv"),  # 2 bits, 48-groups of whole words
    (7, 64, 12, 4, False, 2, "gemv"),  # groups that split words: the byte tile
    (9, 33, 3, 3, False, 3, "gemv"),  # 3-bit codes spanning bytes, odd K
    (1, 1, 128, 8, True, 2, "gemv"),  # 1x1
    (17, 100, 32, 4, False, 20, "dot"),  # K=100: rows of 50 bytes, not whole words: the byte tile
    (17, 256, 64, 4, False, 20, "dot"),  # words, asym g64
    (24, 64, 64, 2, True, 17, "dot"),  # 2 bits
    (5, 576, 128, 8, False, 18, "dot"),  # 8 bits, K=576 g128
    (17, 256, 128, 4, True, 40, "dequant"),  # sym g128
    (9, 96, 32, 4, False, 33, "dequant"),  # asym g32
    (9, 33, 3, 3, False, 3, "dequant"),  # byte rows
]
SLOW = [
    (n, k, gs, bits, sym, m, path)
    for n, k, gs in [(31, 130, 128), (3, 7, 4)]
    for bits in (3, 5, 6, 8)
    for sym in (True, False)
    for m, path in ((5, "gemv"), (19, "dot"), (19, "dequant"))
]


def _check(kernel, n, k, gs, bits, sym, m, path, dtype=torch.float32):
    q = quantize_affine(torch.randn(n, k), QuantScheme(bits=bits, group_size=gs, symmetric=sym))
    qw, scale = pack(q.codes, bits).to(DEVICE), q.scale.to(DEVICE)
    zero = None if q.zero is None else q.zero.to(DEVICE)
    bias = torch.randn(n, device=DEVICE)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    ref = _reference(x, qw, scale, zero, bias, bits, q.group_size, k)
    got = kernel.triton_int_linear(x, qw, scale, zero, bias, bits, q.group_size, k, path)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    # measured under the interpreter (the FAST cases and the bf16 ones below, seeds 0-2): fp32 <= 7.6e-7
    # of max|y| (summation order); bf16 <= 1.5e-2 of max|y| (the reference rounds the dequantized
    # weight to bf16 before its matmul, the GEMV multiplies fp32 weights and rounds once at the end)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    atol = tol * max(ref.float().abs().max().item(), 1e-6)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=atol, msg=lambda s: f"{(n, k, gs, bits, sym, m, path)}: {s}")


@pytest.mark.parametrize("case", FAST, ids=[f"{c[0]}x{c[1]}-g{c[2]}-b{c[3]}-{'sym' if c[4] else 'asym'}-m{c[5]}-{c[6]}" for c in FAST])
def test_triton_matches_reference(kernel, case):
    _check(kernel, *case)


def test_kmajor_layout_dot_kernel_matches_reference(kernel):
    """The pre-shuffled (K-major words) tl.dot tile: same products as the checkpoint layout."""
    from torchcompress.primitives.kernel_layout import to_kmajor

    for gs, sym in ((32, False), (128, True)):
        q = quantize_affine(torch.randn(19, 256), QuantScheme(bits=4, group_size=gs, symmetric=sym))
        qw, scale = pack(q.codes, 4).to(DEVICE), q.scale.to(DEVICE)
        zero = None if q.zero is None else q.zero.to(DEVICE)
        x = torch.randn(21, 256, device=DEVICE)
        ref = _reference(x, qw, scale, zero, None, 4, gs, 256)
        got = kernel.triton_int_linear(x, qw, scale, zero, None, 4, gs, 256, "dot", to_kmajor(qw, 4, 256))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_dequant_kernel_is_exact(kernel):
    """The DEQUANT regime's weight equals the reference dequantization bit for bit (same fp32 math)."""
    from torchcompress.ops.int_linear import dequantize_packed

    for bits, gs, k in ((4, 64, 192), (3, 5, 33)):
        q = quantize_affine(torch.randn(11, k), QuantScheme(bits=bits, group_size=gs, symmetric=False))
        args = (pack(q.codes, bits).to(DEVICE), q.scale.to(DEVICE), q.zero.to(DEVICE))
        got = kernel.triton_dequantize(*args, bits, gs, k, torch.float32)
        assert torch.equal(got, dequantize_packed(*args, bits, gs, k, torch.float32))


def test_auto_follows_the_dispatcher(kernel, monkeypatch):
    """path="auto" runs the regime the crossovers name: with gemv=2,dot=4 a batch of 3 takes the
    tl.dot kernel and a batch of 5 the dequant one (checked by which kernel launches)."""
    q = quantize_affine(torch.randn(9, 64), QuantScheme(bits=4, group_size=32))
    args = (pack(q.codes, 4).to(DEVICE), q.scale.to(DEVICE), None, None, 4, 32, 64)
    launched = []
    real = kernel.run_regime
    monkeypatch.setattr(kernel, "run_regime", lambda regime, *a: launched.append(regime.value) or real(regime, *a))
    monkeypatch.setenv("TORCHCOMPRESS_CROSSOVERS", "gemv=2,dot=4")
    for m in (2, 3, 5):
        x = torch.randn(m, 64, device=DEVICE)
        torch.testing.assert_close(kernel.triton_int_linear(x, *args), _reference(x, *args), rtol=1e-5, atol=1e-5)
    assert launched == ["gemv", "dot", "dequant"]


def test_m_bucket():
    from torchcompress.ops.triton.int_linear import m_bucket

    assert [m_bucket(m) for m in (1, 2, 3, 9, 16, 17, 500, 512)] == [1, 2, 4, 16, 16, 32, 512, 512]


def test_triton_bf16_and_3d_input(kernel):
    _check(kernel, 17, 100, 32, 4, True, 2, "gemv", torch.bfloat16)  # two K slices: fp32 atomics, then the cast
    _check(kernel, 7, 64, 32, 4, False, 3, "gemv", torch.bfloat16)  # one K slice: bias and cast in the kernel
    _check(kernel, 17, 256, 32, 4, False, 17, "dot", torch.bfloat16)
    _check(kernel, 17, 256, 32, 4, False, 17, "dequant", torch.bfloat16)
    q = quantize_affine(torch.randn(8, 64), QuantScheme(bits=4, group_size=32))
    x = torch.randn(2, 3, 64, device=DEVICE)
    args = (pack(q.codes, 4).to(DEVICE), q.scale.to(DEVICE), None, None, 4, 32, 64)
    torch.testing.assert_close(kernel.triton_int_linear(x, *args), _reference(x, *args), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW)
def test_triton_matches_reference_full(kernel, case):
    _check(kernel, *case)


def test_cpu_use_never_loads_the_triton_kernels():
    import subprocess
    import sys

    # (torch itself may import triton on the first custom-op call; our kernels must stay unloaded)
    code = "import sys, torch, torchcompress as tc\n" \
           "m = torch.nn.Sequential(torch.nn.Linear(64, 8)); tc.quantize_(m, tc.QuantScheme(bits=4, group_size=32)); m(torch.randn(1, 64))\n" \
           "print('torchcompress.ops.triton.int_linear' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("m,path", [(3, "gemv"), (17, "dot"), (17, "dequant")])
def test_float_zero_points(kernel, m, path):
    """HQQ-style float zero points (stored like the scale) through every regime."""
    q = quantize_affine(torch.randn(9, 128), QuantScheme(bits=4, group_size=64, symmetric=False, float_zero=True))
    assert q.zero.is_floating_point()
    args = (pack(q.codes, 4).to(DEVICE), q.scale.to(DEVICE), q.zero.to(DEVICE), None, 4, 64, 128)
    x = torch.randn(m, 128, device=DEVICE)
    ref = _reference(x, *args)
    torch.testing.assert_close(kernel.triton_int_linear(x, *args, path), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
