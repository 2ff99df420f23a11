"""GGUF block formats: bytes vs gguf-py (legacy types) and vs ggml's own reference C code (all types)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from torchcompress.errors import ConfigError, NumericError
from torchcompress.primitives.gguf_blocks import dequantize, quantize
from torchcompress.primitives.gguf_common import LAYOUTS, GGMLType, nearest_int, round_away

gguf = pytest.importorskip("gguf")
GT = gguf.GGMLQuantizationType

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
VECTORS = Path(__file__).parent.parent / "data" / "gguf" / "ggml_ref_vectors.npz"


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    c = {
        "randn": torch.randn(32, 256, generator=g),
        "llm_like": torch.randn(16, 512, generator=g) * 0.02,
        "zeros": torch.zeros(4, 64),
        "tiny_1e-6": torch.randn(4, 64, generator=g) * 1e-6,
        "tiny_1e-30": torch.randn(4, 64, generator=g) * 1e-30,
        "denormal": torch.randn(4, 64, generator=g) * 1e-40,
        "fp16_overflow": torch.randn(4, 64, generator=g) * 1e6,
        "const": torch.full((2, 64), 0.37),
        "ints": torch.randint(-8, 8, (4, 64), generator=g).float(),
        "halves": (torch.randint(-64, 64, (4, 64), generator=g) + 0.5) / 8,
    }
    o = torch.randn(8, 64, generator=g) * 0.01
    o[0, 5], o[1, 40], o[2, ::8], o[3, 63] = 1e4, -3e4, 2.0, -7.5
    o[4, :32] = 0  # one all-zero block next to a normal one
    c["outliers"] = o
    return c


@pytest.mark.parametrize("qtype", LEGACY)
@pytest.mark.parametrize("case", list(_cases()))
def test_legacy_bytes_match_gguf_py(qtype, case):
    x = _cases()[case]
    ours = quantize(x, GGMLType[qtype]).numpy()
    with np.errstate(all="ignore"):
        ref = gguf.quants.quantize(x.numpy(), GT[qtype])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    # bit-identical, except that any NaN equals any NaN (payloads are not part of the contract)
    nan = np.isnan(a) & np.isnan(b)
    return bool(np.array_equal(np.where(nan, 0, a).view(np.uint32), np.where(nan, 0, b).view(np.uint32)))


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_dequantize_matches_gguf_py(qtype):
    qt = GGMLType[qtype]
    lay = LAYOUTS[qt]
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(8, 512, generator=g), torch.zeros(1, 512), torch.randn(1, 512, generator=g) * 1e5])
    blobs = [quantize(x, qt)]
    # arbitrary bytes too: every bit pattern a hostile or foreign file could hold
    blobs.append(torch.randint(0, 256, (6, 512 // lay.block_size * lay.type_size), generator=g, dtype=torch.uint8))
    for data in blobs:
        shape = (data.shape[0], 512)
        ours = dequantize(data, qt, shape).numpy()
        with np.errstate(all="ignore"):
            ref = gguf.quants.dequantize(data.numpy(), GT[qtype])
        assert _same_floats(ours, ref)


@pytest.fixture(scope="module")
def ggml_vectors():
    return np.load(VECTORS)


@pytest.mark.parametrize("qtype", LEGACY + ["Q8_1"] + KQUANTS)
def test_bytes_match_ggml_reference(qtype, ggml_vectors):
    """Vectors from ggml's quantize_row_*_ref, compiled by tests/data/gguf/gen_vectors.py."""
    names = sorted(k[3:] for k in ggml_vectors.files if k.startswith("in/"))
    assert len(names) >= 10
    key = qtype.lower().replace("_k", "_K")
    for name in names:
        x = torch.from_numpy(ggml_vectors[f"in/{name}"])
        ref = ggml_vectors[f"out/{name}/{key}"]
        ours = quantize(x, GGMLType[qtype]).numpy()
        assert np.array_equal(ours, ref), f"{qtype} differs from ggml on case {name!r}"


def test_q8_1_sum_field_and_dequant():
    x = torch.randn(4, 64)
    data = quantize(x, GGMLType.Q8_1).reshape(-1, 36)
    q = data[:, 4:].contiguous().view(torch.int8).to(torch.float32)
    s = data[:, 2:4].contiguous().view(torch.float16).float()[:, 0]
    d32 = x.reshape(-1, 32).abs().amax(1) / 127  # s uses the float32 d, before its fp16 rounding
    assert torch.equal(s, (q.sum(1) * d32).half().float())
    assert torch.equal(dequantize(quantize(x, GGMLType.Q8_1), GGMLType.Q8_1, x.shape),
                       dequantize(quantize(x, GGMLType.Q8_0), GGMLType.Q8_0, x.shape))


@pytest.mark.parametrize("qtype,floor_db", [("Q8_0", 38), ("Q6_K", 28), ("Q5_K", 22), ("Q4_K", 17), ("Q4_0", 15), ("Q3_K", 11), ("Q2_K", 5)])
def test_quality_floor(qtype, floor_db):
    x = torch.randn(64, 512) * 0.02
    xh = dequantize(quantize(x, GGMLType[qtype]), GGMLType[qtype], x.shape)
    sqnr = 20 * torch.log10(x.norm() / (x - xh).norm())
    assert sqnr > floor_db


def test_scalar_rules():
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 4194303.0, 1e7], dtype=torch.float32)
    assert nearest_int(v).tolist()[:6] == [0, 2, 2, 0, -2, 4194303]  # ties to even, like rint
    assert round_away(torch.tensor([0.5, -0.5, 1.5, 0.49999997])).tolist() == [1.0, -1.0, 2.0, 0.0]


def test_bad_inputs():
    with pytest.raises(ConfigError, match="multiple of"):
        quantize(torch.randn(2, 100), GGMLType.Q4_0)
    with pytest.raises(ConfigError, match="multiple of"):
        quantize(torch.randn(2, 576), GGMLType.Q4_K)
    x = torch.randn(2, 64)
    x[1, 3] = float("nan")
    with pytest.raises(NumericError, match="w.weight"):
        quantize(x, GGMLType.Q8_0, name="w.weight")
    with pytest.raises(ConfigError):
        dequantize(torch.zeros(17, dtype=torch.uint8), GGMLType.Q4_0, (1, 32))
