"""GPTQ-format export: layout checked by an independent decoder written from the published format
(shift-and-mask per 32-bit word, v1 zero points), and a load back giving the same outputs."""

import copy

import pytest
import torch

from torchcompress.calibration.runner import gptq_model
from torchcompress.config import GPTQConfig, QuantScheme
from torchcompress.errors import FormatError
from torchcompress.formats.gptq import gptq_tensors, load_gptq, save_gptq

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def base():
    from tests.tiny import calibrated_tiny_llama

    return calibrated_tiny_llama()


def _decode_bits(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Independent reader: value i of a column of int32 words sits at global bit i*bits (LSB first)."""
    w = words.to(torch.int64) & 0xFFFFFFFF  # (W, C) unsigned 32-bit
    out = torch.empty(count, w.shape[1], dtype=torch.int64)
    for i in range(count):
        bit = i * bits
        word, off = divmod(bit, 32)
        v = w[word] >> off
        if off + bits > 32:  # straddles into the next word (3-bit codes 10, 21, ...)
            v = v | (w[word + 1] << (32 - off))
        out[i] = v & ((1 << bits) - 1)
    return out


@pytest.mark.parametrize("bits,sym,act_order", [(4, True, True), (3, True, True), (8, True, False), (3, False, True)])
def test_layout_and_round_trip(base, tmp_path, bits, sym, act_order):
    model, tok, calib = base
    q = gptq_model(copy.deepcopy(model), GPTQConfig(QuantScheme(bits=bits, group_size=32, symmetric=sym),
                                                    act_order=act_order), calib)
    name = "model.layers.1.mlp.down_proj"  # K=192, N=128
    m = q.get_submodule(name)
    try:
        t = gptq_tensors(name, m)
    except FormatError as e:  # an asymmetric zero point of 0 cannot be stored in v1
        assert not sym and "zero points equal to 0" in str(e)
        return
    codes = _decode_bits(t[f"{name}.qweight"], bits, m.in_features)  # (K, N)
    zeros = _decode_bits(t[f"{name}.qzeros"].T, bits, m.out_features) + 1  # (N, G) with the v1 +1
    g = t[f"{name}.g_idx"].long()
    w = t[f"{name}.scales"].float()[g] * (codes - zeros.T[g]).float()  # (K, N), as GPTQ loaders compute
    assert torch.equal(w.T, m.dequantize(torch.float32))
    save_gptq(q, tmp_path / "g", tok)
    back = load_gptq(tmp_path / "g")
    ids = calib.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


def test_refusals(base, tmp_path):
    model, tok, calib = base
    q = gptq_model(copy.deepcopy(model), GPTQConfig(QuantScheme(bits=4, granularity="channel")), calib)
    with pytest.raises(FormatError, match="group-wise"):
        save_gptq(q, tmp_path / "a", tok)
    q = gptq_model(copy.deepcopy(model), GPTQConfig(QuantScheme(bits=4, group_size=32, scale_dtype="bfloat16")), calib)
    with pytest.raises(FormatError, match="fp16 scales"):
        save_gptq(q, tmp_path / "b", tok)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
