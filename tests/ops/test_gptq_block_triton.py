"""The fused Triton GPTQ block kernel against the same loop in PyTorch, under ``TRITON_INTERPRET=1``
(on CUDA when present). Measured under the interpreter: codes and errors bit-identical (the
interpreter does the fp32 operations one by one, as PyTorch does). On CUDA, Triton may contract
``W - err * u`` into an FMA, so there codes may differ where a value lands within an ulp of a
rounding tie: there the check is a tolerance on the errors and a bound on changed codes, both
unmeasured guesses (no GPU was available when this was written): revisit on the first CUDA run."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton; the [gpu] extra)")

from torchcompress.config import QuantScheme  # noqa: E402
from torchcompress.primitives.affine import compute_qparams  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def _block(n, b, gs, bits, sym, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, b, generator=g)
    x = torch.randn(4 * b, b, generator=g)
    h = x.T @ x / (4 * b) + 0.01 * torch.eye(b)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale, zero, gsz = compute_qparams(w, QuantScheme(bits=bits, group_size=gs, symmetric=sym))
    s_cols = scale.float().repeat_interleave(gsz, 1)[:, :b]
    z_cols = None if zero is None else zero.float().repeat_interleave(gsz, 1)[:, :b]
    return w, u, s_cols, z_cols


@pytest.mark.parametrize("n,b,gs,bits,sym", [(19, 40, 16, 4, False), (5, 33, 33, 3, True), (40, 64, 32, 8, False)])
def test_fused_block_matches_pytorch_loop(n, b, gs, bits, sym):
    from torchcompress.ops.triton.gptq_block import gptq_block_reference, triton_gptq_block

    w, u, s, z = _block(n, b, gs, bits, sym, n + b)
    codes_ref, err_ref = gptq_block_reference(w, u, s, z, bits)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    codes, err = triton_gptq_block(dev(w), dev(u), dev(s), dev(z), bits)
    codes, err = codes.cpu(), err.cpu()
    if not CUDA:
        assert torch.equal(codes, codes_ref)
        assert torch.equal(err, err_ref)
    else:
        assert (codes != codes_ref).float().mean() < 1e-3
        torch.testing.assert_close(err, err_ref, rtol=1e-4, atol=1e-4 * err_ref.abs().max().item())


@pytest.mark.parametrize("act_order,static,gran", [(True, False, "group"), (False, True, "group"), (True, False, "channel")])
def test_gptq_quantize_fused_equals_loop(act_order, static, gran):
    """gptq_quantize with the fused kernel (forced on; on CPU it runs interpreted) gives the same
    codes, scales, zero points and g_idx as its PyTorch column loop."""
    from torchcompress.primitives.gptq import accumulate_hessian, gptq_quantize

    k, n = 96, 12
    g = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(200, k, generator=g) @ torch.randn(k, k, generator=g) / k ** 0.5
    h = accumulate_hessian(torch.zeros(k, k, dtype=torch.float64), x) * (2 / 200)
    kw = dict(group_size=32) if gran == "group" else dict(granularity="channel")
    scheme = QuantScheme(bits=4, symmetric=False, **kw)
    common = dict(block_size=32, act_order=act_order, static_groups=static)
    loop = gptq_quantize(w, h, scheme, fused=False, **common)
    fused = gptq_quantize(w.to(DEVICE), h.to(DEVICE), scheme, fused=True, **common)
    assert torch.equal(fused.g_idx.cpu(), loop.g_idx)
    assert torch.equal(fused.scale.cpu(), loop.scale) and torch.equal(fused.zero.cpu(), loop.zero)
    if not CUDA:
        assert torch.equal(fused.codes.cpu(), loop.codes)
    else:
        assert (fused.codes.cpu() != loop.codes).float().mean() < 1e-3
