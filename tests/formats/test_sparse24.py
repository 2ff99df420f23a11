"""2:4 sparse export (compressed-tensors ``sparse-24-bitmask``, issue #21 item 6): the packing against a naive
numpy implementation of the layout, the byte budget, and bit-exact reloads (float, INT8 and FP8 values)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import torchcompress as tc
from torchcompress.errors import FormatError
from torchcompress.formats.sparse24 import compress24, decompress24, save_sparse24
from torchcompress.prune.config import MagnitudePruneConfig


def _naive(w: torch.Tensor):
    """Row by row: keep the non-zeros, then the first zeros, two per group of four; bits little-endian."""
    rows_v, rows_m = [], []
    for row in w.tolist():
        vals, mask = [], []
        for g in range(0, len(row), 4):
            grp = row[g:g + 4]
            keep = [i for i, x in enumerate(grp) if x != 0]
            keep += [i for i, x in enumerate(grp) if x == 0][: 2 - len(keep)]
            keep.sort()
            mask += [i in keep for i in range(4)]
            vals += [grp[i] for i in keep]
        rows_v.append(vals)
        rows_m.append(np.packbits(np.array(mask, dtype=np.uint8), bitorder="little"))
    return torch.tensor(rows_v, dtype=w.dtype), torch.from_numpy(np.stack(rows_m))


def _two_four(n, k, seed=0, extra_zeros=0.2):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    idx = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]  # two kept per group
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, idx, True).reshape(n, k)
    mask &= torch.rand(n, k, generator=g) > extra_zeros  # some groups keep fewer than two
    return w * mask


@pytest.mark.parametrize("k", [8, 12, 64, 36])
def test_packing_equals_a_naive_implementation_and_round_trips(k):
    w = _two_four(5, k, seed=k)
    values, bitmask = compress24(w)
    nv, nm = _naive(w)
    assert torch.equal(values, nv) and torch.equal(bitmask, nm)
    assert torch.equal(decompress24(values, bitmask, w.shape), w)


def test_a_group_with_three_non_zeros_is_refused_by_position():
    w = _two_four(3, 16)
    w[2, 8:11] = 1.0
    with pytest.raises(FormatError) as ei:
        compress24(w, "model.layers.0.mlp.up_proj.weight")
    msg = str(ei.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "row 2" in msg and "8..11" in msg


def _pruned(tiny_llama, dtype=torch.float32):
    model = tiny_llama().to(dtype)
    tc.prune_(model, MagnitudePruneConfig(n=2, m=4), ignore=["lm_head"])
    return model


def _linear_bytes(path, suffixes):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys() if k.endswith(suffixes) and ".layers." in k)


@pytest.mark.hf
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_export_is_under_0_6x_and_reloads_bit_exactly(tmp_path, tiny_llama, token_ids, dtype):
    model = _pruned(tiny_llama, dtype)
    with torch.no_grad():
        ref = model(token_ids).logits
    dense = sum(m.weight.nbytes for n, m in model.named_modules() if n.endswith("_proj"))
    out = save_sparse24(model, tmp_path / "s")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["format"] == "sparse-24-bitmask" and len(qc["sparsity_config"]["targets"]) == 14
    stored = _linear_bytes(out, (".compressed", ".bitmask"))
    # values K/2 in the model dtype + K/8 bitmask bytes: 0.531x (fp32), 0.5625x (bf16)
    assert stored / dense <= 0.6, stored / dense
    loaded = tc.load_compressed(out)
    for n, m in model.named_modules():  # every weight bit for bit, in the model's dtype
        if n.endswith("_proj"):
            assert torch.equal(loaded.get_submodule(n).weight, m.weight * m.mask.to(dtype)), n
    if dtype == torch.float32:  # (a bf16 .to() also casts the rotary buffer, which a fresh skeleton keeps fp32)
        with torch.no_grad():
            assert torch.equal(loaded(token_ids).logits, ref)
    q = loaded.model.layers[1].mlp.down_proj
    assert type(q).__name__ == "PrunedLinear" and q.nm == (2, 4)


@pytest.mark.hf
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_int8_and_fp8_values_are_under_0_35x_of_bf16_and_reload_bit_exactly(tmp_path, tiny_llama, token_ids, scheme):
    from torchcompress.quant.scheme_config import FP8Config, W8A8Int8Config
    from torchcompress.quant.schemes import apply_scheme_

    model = _pruned(tiny_llama)
    dense_bf16 = sum(m.weight.numel() * 2 for n, m in model.named_modules() if n.endswith("_proj"))
    model = apply_scheme_(model, W8A8Int8Config() if scheme == "int8" else FP8Config(), None)
    with torch.no_grad():
        ref = model(token_ids).logits
    out = save_sparse24(model, tmp_path / "s")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == ("int-quantized" if scheme == "int8" else "float-quantized")
    assert len(qc["sparsity_config"]["targets"]) == 14
    stored = _linear_bytes(out, (".compressed", ".bitmask"))
    assert stored / dense_bf16 <= 0.35, stored / dense_bf16  # K/2 + K/8 bytes of 2K: 0.3125x
    loaded = tc.load_compressed(out)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, ref)


@pytest.mark.hf
def test_a_model_without_2of4_layers_is_refused(tmp_path, tiny_llama):
    with pytest.raises(FormatError) as ei:
        save_sparse24(tiny_llama(), tmp_path / "s")
    assert "2:4" in str(ei.value)
    assert not (tmp_path / "s").exists()
