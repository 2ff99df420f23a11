"""The PyTorch reference of ggml's importance-weighted (imatrix) quantizers (primitives/gguf_imatrix.py):
byte-identical to the native kernels (kernels/cpu/gguf_quant.cpp) and to ggml's own C code (committed
vectors from ``quantize_<type>(..., quant_weights)``), and what ``quantize`` uses without the native
extension or with ``TORCHCOMPRESS_KERNEL=reference``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from torchcompress.primitives import gguf_blocks
from torchcompress.primitives.gguf_blocks import (
    IMATRIX_TYPES,
    IQUANTS,
    quantize,
    quantize_reference,
)
from torchcompress.primitives.gguf_common import LAYOUTS, GGMLType

DATA = Path(__file__).parent.parent / "data" / "gguf"
TYPES = [t.name for t in IMATRIX_TYPES if t not in IQUANTS]  # IQ4_NL/IQ4_XS: tests/primitives/test_gguf_iquants.py
GGML_NAMES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
              "q2_K": "Q2_K", "q3_K": "Q3_K", "q4_K": "Q4_K", "q5_K": "Q5_K", "q6_K": "Q6_K"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The reference is thousands of tiny ops: intra-op threads only add contention (7x slower on a
    busy 2-core box). Bytes do not depend on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def native():
    op = gguf_blocks._native_op()
    if op is None:
        pytest.skip("native CPU kernels unavailable")
    return op


def _cases(k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    # real-looking: per-column importance spread over 4 orders of magnitude (as an imatrix of mean
    # squared activations is), weights ~N(0, 0.02) with rare large outliers
    imp = torch.logspace(-2, 2, k)[torch.randperm(k, generator=g)] * (0.5 + torch.rand(k, generator=g))
    w = torch.randn(40, k, generator=g) * 0.02
    w[torch.rand(40, k, generator=g) < 0.003] *= 30
    c = {"llm": (w, imp), "randn": (torch.randn(12, k, generator=g), torch.rand(k, generator=g))}
    o = torch.randn(6, k, generator=g)  # rows with outliers
    o[:, 7] = 50.0
    o[2, ::37] = -200.0
    c["outliers"] = (o, imp)
    z = torch.randn(8, k, generator=g)  # all-zero blocks, +0/-0 mixes, dead importance columns
    z[:, :64] = 0
    z[3] = 0
    z[4, :256:3] = -0.0
    z[5, 1:64:2] = -0.0
    dead = imp.clone()
    dead[96:160] = 0
    c["zeros"] = (z, dead)
    c["tiny"] = (torch.randn(3, k, generator=g) * 1e-20, imp)
    c["denormal"] = (torch.randn(2, k, generator=g) * 1e-40, imp)
    c["huge"] = (torch.randn(2, k, generator=g) * 1e4, imp)
    c["ties"] = ((torch.randint(-64, 64, (3, k), generator=g) + 0.5) / 8, imp)
    c["one_signed"] = (torch.cat([torch.rand(2, k, generator=g) + 0.1, -torch.rand(2, k, generator=g) - 0.1]), imp)
    c["zero_importance"] = (torch.randn(2, k, generator=g), torch.zeros(k))
    return c


def _differing_blocks(a: torch.Tensor, b: torch.Tensor, qtype: GGMLType) -> int:
    ts = LAYOUTS[qtype].type_size
    return int((a.reshape(-1, ts) != b.reshape(-1, ts)).any(1).sum())


@pytest.mark.parametrize("qtype", TYPES)
def test_reference_equals_native(native, qtype):
    t = GGMLType[qtype]
    k = 512 if qtype.endswith("K") else 576  # 576: SmolLM2's rows, quantized with the 32-weight types
    bad = {}
    for name, (x, imp) in _cases(k).items():
        ref = quantize_reference(x, t, importance=imp)
        nat = native(x.contiguous(), int(t), imp)
        assert ref.shape == nat.shape == (x.shape[0], k // LAYOUTS[t].block_size * LAYOUTS[t].type_size)
        n = _differing_blocks(ref, nat, t)
        if n:
            bad[name] = n
    assert not bad, f"{qtype}: blocks differing from the native kernel per case: {bad}"


@pytest.mark.parametrize("qtype", TYPES)
def test_reference_matches_ggml_vectors(qtype):
    """Against ggml's own weighted quantizers (no native extension needed)."""
    vec = np.load(DATA / "ggml_imatrix_vectors.npz")
    keys = [f for f in vec.files if f.startswith("out/") and GGML_NAMES[f.split("/")[2]] == qtype]
    assert len(keys) >= 5
    for key in keys:
        case = key.split("/")[1]
        x, imp = torch.from_numpy(vec["in/" + case]), torch.from_numpy(vec["imp/" + case])
        ours = quantize_reference(x, GGMLType[qtype], importance=imp).numpy()
        assert np.array_equal(ours, vec[key]), f"{key}: {_differing_blocks(torch.from_numpy(ours), torch.from_numpy(vec[key]), GGMLType[qtype])} blocks differ"
        if case == "llm":  # the weights matter: the unweighted quantizer gives other bytes
            assert not np.array_equal(quantize_reference(x, GGMLType[qtype]).numpy(), vec[key])


def test_reference_backend_quantizes_with_importance(native, monkeypatch):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 512, generator=g) * 0.05  # leading dims are kept
    imp = torch.logspace(-2, 2, 512)
    want = {q: quantize(x, GGMLType[q], importance=imp) for q in ("Q4_K", "Q6_K", "Q5_0", "Q8_0")}
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")
    assert gguf_blocks._native_op() is None
    for q, w in want.items():
        got = quantize(x, GGMLType[q], importance=imp)
        assert got.shape == w.shape and torch.equal(got, w), q
    # Q8_0 has no weighted quantizer in ggml: importance is accepted and ignored
    assert torch.equal(want["Q8_0"], quantize(x, GGMLType.Q8_0))
