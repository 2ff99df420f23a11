"""Native GGUF quantizers (kernels/cpu/gguf_quant.cpp): byte-identical to the PyTorch reference and to
ggml's own C code (committed vectors: ``quantize_row_*_ref`` and the imatrix ``quantize_<type>`` path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from torchcompress.errors import ConfigError, NumericError
from torchcompress.primitives import gguf_blocks
from torchcompress.primitives.gguf_blocks import quantize, quantize_reference
from torchcompress.primitives.gguf_common import GGMLType

DATA = Path(__file__).parent.parent / "data" / "gguf"
ALL = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
NAMES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "q8_1": "Q8_1",
         "q2_K": "Q2_K", "q3_K": "Q3_K", "q4_K": "Q4_K", "q5_K": "Q5_K", "q6_K": "Q6_K"}


@pytest.fixture(scope="module")
def native():
    op = gguf_blocks._native_op()
    if op is None:
        pytest.skip("native CPU kernels unavailable")
    return op


def _cases(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    c = {
        "randn": torch.randn(8, k, generator=g),
        "llm_like": torch.randn(12, k, generator=g) * 0.02 + torch.randn(12, k, generator=g).pow(3) * 0.004,
        "zeros": torch.zeros(2, k),
        "denormal": torch.randn(3, k, generator=g) * 1e-40,
        "tiny": torch.randn(3, k, generator=g) * 1e-20,
        "huge": torch.randn(3, k, generator=g) * 1e6,
        "ties": (torch.randint(-64, 64, (3, k), generator=g) + 0.5) / 8,
        "const_neg": torch.full((2, k), -0.3),
    }
    r = torch.randn(6, k, generator=g)  # huge dynamic range inside rows: 1e-30 .. 1e4
    r *= torch.logspace(-30, 4, k).roll(k // 3)
    r[0, :48] = 0
    r[1, ::5] = -0.0
    c["range"] = r
    return c


@pytest.mark.parametrize("qtype", ALL)
def test_native_equals_reference(native, qtype):
    t = GGMLType[qtype]
    k = 576 if t.name[-1] != "K" else 512  # 576: SmolLM2's rows, quantized with the fallback types
    for name, x in _cases(k).items():
        ours = native(x.contiguous(), int(t), None)
        ref = quantize_reference(x, t)
        assert torch.equal(ours, ref), f"{qtype} {name}: native != PyTorch reference"


@pytest.mark.parametrize("qtype", ALL)
def test_native_and_reference_match_ggml(native, qtype, monkeypatch):
    vec = np.load(DATA / "ggml_ref_vectors.npz")
    t = GGMLType[qtype]
    keys = [f for f in vec.files if f.startswith("out/") and NAMES[f.split("/")[2]] == qtype]
    assert keys
    for key in keys:
        x = torch.from_numpy(vec["in/" + key.split("/")[1]])
        assert np.array_equal(native(x, int(t), None).numpy(), vec[key]), key
        assert np.array_equal(quantize_reference(x, t).numpy(), vec[key]), key
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")
    assert gguf_blocks._native_op() is None


@pytest.mark.parametrize("qtype", KQUANTS + ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_imatrix_matches_ggml(native, qtype):
    vec = np.load(DATA / "ggml_imatrix_vectors.npz")
    keys = [f for f in vec.files if f.startswith("out/") and NAMES[f.split("/")[2]] == qtype]
    assert len(keys) >= 5
    for key in keys:
        case = key.split("/")[1]
        x, imp = torch.from_numpy(vec["in/" + case]), torch.from_numpy(vec["imp/" + case])
        ours = quantize(x, GGMLType[qtype], importance=imp)
        assert np.array_equal(ours.numpy(), vec[key]), key
        # the importance weights matter: without them the bytes differ (for non-trivial data)
        if case == "llm":
            assert not np.array_equal(quantize(x, GGMLType[qtype]).numpy(), vec[key])


def test_threads_do_not_change_bytes(native):
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [native(x, int(GGMLType[q]), None) for q in ("Q4_K", "Q8_0")]
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, native(x, int(GGMLType[q]), None)) for a, q in zip(one, ("Q4_K", "Q8_0")))


def test_importance_errors(monkeypatch):
    x = torch.randn(2, 256)
    with pytest.raises(ConfigError, match="no importance-weighted"):
        quantize(x, GGMLType.Q8_1, importance=torch.ones(256))
    with pytest.raises(ConfigError, match="255 importance weights"):
        quantize(x, GGMLType.Q4_K, importance=torch.ones(255))
    with pytest.raises(NumericError):
        quantize(x, GGMLType.Q4_K, importance=-torch.ones(256))
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")  # the PyTorch fallback validates the same way
    with pytest.raises(ConfigError, match="255 importance weights"):
        quantize(x, GGMLType.Q4_K, importance=torch.ones(255))
    with pytest.raises(ConfigError, match="no importance-weighted"):
        quantize_reference(x, GGMLType.Q8_1, importance=torch.ones(256))
