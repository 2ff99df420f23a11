"""Triton kernels for GGUF blocks (Q4_0, Q5_0, Q8_0, Q4_K, Q6_K) and for GPTQ act-order weights
against their references, on CPU under ``TRITON_INTERPRET=1`` (and on CUDA when present).

GGUF: N off the 16-row block, several blocks per row, each regime: GEMV (split-K partial sums, several
rows of x per program), ``tl.dot`` tiles, dequantize + F.linear. GPTQ act-order: the int_linear Triton
kernels on columns sorted by group (primitives/act_order.py), each regime, with K=100 (a partial last
group, rows of bytes) and K=128 (rows of int32 words). Measured errors under the interpreter (FAST,
seeds 0-1) <= 5.4e-7 of max|y|; tolerance fp32 1e-5 as for the other kernels. The full matrix is marked slow (the
interpreter needs about a second per launch).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (see test_int_linear_triton)
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton; the [gpu] extra)")

from torchcompress.config import QuantScheme  # noqa: E402
from torchcompress.ops.gptq_linear import dequantize_g_idx_packed  # noqa: E402
from torchcompress.primitives.act_order import sort_by_group  # noqa: E402
from torchcompress.primitives.affine import quantize_affine  # noqa: E402
from torchcompress.primitives.gguf_blocks import dequantize, quantize  # noqa: E402
from torchcompress.primitives.gguf_common import GGMLType  # noqa: E402
from torchcompress.primitives.packing import pack  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
TYPES = [GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS]
FAST = [(GGMLType.Q4_0, 2, "gemv"), (GGMLType.Q5_0, 17, "dot"), (GGMLType.Q8_0, 1, "gemv"),
        (GGMLType.Q8_0, 18, "dot"), (GGMLType.Q8_0, 20, "dequant"), (GGMLType.Q4_K, 5, "gemv"),
        (GGMLType.Q4_K, 17, "dot"), (GGMLType.Q4_K, 20, "dequant"), (GGMLType.Q6_K, 3, "gemv"),
        (GGMLType.Q6_K, 17, "dot"), (GGMLType.Q6_K, 9, "dequant"), (GGMLType.IQ4_NL, 2, "gemv"),
        (GGMLType.IQ4_XS, 17, "dot"), (GGMLType.IQ4_XS, 1, "gemv")]
SLOW = [(t, m, p) for t in TYPES for m, p in ((1, "gemv"), (11, "gemv"), (20, "dot"), (20, "dequant"))]


def _close(got, ref, what):
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-5 * ref.float().abs().max().item(),
                               msg=lambda s: f"{what}: {s}")


def _check_gguf(qtype, m, path, k=None):
    from torchcompress.ops.triton.gguf_linear import triton_gguf_linear

    k = k or (512 if qtype in (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.IQ4_XS) else 96)
    n = 17
    w = torch.randn(n, k)
    w[0, :32] = 0.0  # an all-zero block
    blocks = quantize(w, qtype)
    bias = torch.randn(n)
    x = torch.randn(m, k)
    ref = F.linear(x, dequantize(blocks, qtype, (n, k)), bias)
    got = triton_gguf_linear(x.to(DEVICE), blocks.to(DEVICE), bias.to(DEVICE), int(qtype), k, path)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    _close(got.cpu(), ref, f"{qtype.name} m={m} {path}")


@pytest.mark.parametrize("case", FAST, ids=[f"{t.name}-m{m}-{p}" for t, m, p in FAST])
def test_triton_gguf_matches_reference(case):
    _check_gguf(*case)


def test_triton_gguf_gemv_one_k_slice():
    """K=64: one K slice under the interpreter, so the GEMV adds the bias and casts in the kernel."""
    _check_gguf(GGMLType.Q8_0, 3, "gemv", k=64)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[f"{t.name}-m{m}-{p}" for t, m, p in SLOW])
def test_triton_gguf_matches_reference_full(case):
    _check_gguf(*case)


@pytest.mark.parametrize("k,m,path", [(100, 2, "gemv"), (128, 5, "gemv"), (100, 17, "dot"), (128, 17, "dot"),
                                      (128, 20, "dequant")])
def test_triton_gptq_act_order(k, m, path):
    from torchcompress.ops.triton.int_linear import triton_int_linear

    n, gs, bits = 9, 32, 4
    q = quantize_affine(torch.randn(n, k), QuantScheme(bits=bits, group_size=gs, symmetric=False))
    order = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    qw = pack(q.codes, bits)
    lay = sort_by_group(qw, g_idx, bits, k, q.scale.shape[1])
    x = torch.randn(m, k)
    ref = F.linear(x, dequantize_g_idx_packed(qw, q.scale, q.zero, g_idx, bits, k, torch.float32))
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    got = triton_int_linear(dev(x).index_select(-1, dev(lay.perm)), dev(lay.qweight), dev(q.scale), dev(q.zero),
                            None, bits, lay.group_size, k, path)
    _close(got.cpu(), ref, f"GPTQ act-order m={m} {path}")
