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
    if not sym:  # v1 stores zero - 1: a zero point of 0 cannot be written; make every layer storable
        for mod in q.modules():
            if getattr(mod, "zero", None) is not None:
                mod.zero.clamp_(min=1)
        assert int(m.zero.min()) >= 1
    t = gptq_tensors(name, m)
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


def test_asymmetric_zero_point_zero_is_refused(base):
    model, _, calib = base
    q = gptq_model(copy.deepcopy(model), GPTQConfig(QuantScheme(bits=3, group_size=32, symmetric=False)), calib)
    m = q.get_submodule("model.layers.1.mlp.down_proj")
    m.zero.clamp_(min=1)
    gptq_tensors("x", m)  # storable
    m.zero[3, 1] = 0
    with pytest.raises(FormatError, match="zero points equal to 0"):
        gptq_tensors("x", m)


def _rtn(model, group):
    from torchcompress.api import freeze_, quantize_
    from torchcompress.config import RTNConfig

    q = copy.deepcopy(model)
    quantize_(q, RTNConfig(QuantScheme(bits=4, group_size=group, scale_dtype="float16")), ignore=["lm_head"])
    return freeze_(q)


def test_partial_last_group_is_refused_naming_the_layer_and_sizes_that_work(base, tmp_path):
    # vLLM's GPTQ loader rejects in_features % group_size != 0 (SmolLM2's 576 at group 128); issue 20 item 5
    model, tok, _ = base
    q = _rtn(model, 128)  # q/k/v/o/gate/up: K=128; down_proj: K=192 -> a last group of 64
    with pytest.raises(FormatError) as e:
        save_gptq(q, tmp_path / "g", tok)
    msg = str(e.value)
    assert "mlp.down_proj" in msg and "192" in msg and "128" in msg
    assert "32, 64" in msg  # the group sizes dividing every layer's width (gcd 64)
    assert not (tmp_path / "g").exists()
    save_gptq(_rtn(model, 64), tmp_path / "ok", tok)  # a size from the message works


def _qcfg(path):
    import json

    return json.loads((path / "quantize_config.json").read_text())


def test_metadata_describes_the_run(base, tmp_path):
    from torchcompress.formats.checkpoint import load_compressed, save_compressed

    model, tok, calib = base
    cfg = GPTQConfig(QuantScheme(bits=4, group_size=32, scale_dtype="float16"), damp=0.05, act_order=True,
                     static_groups=True, true_sequential=False, mse=True)
    q = gptq_model(copy.deepcopy(model), cfg, calib)
    save_gptq(q, tmp_path / "a", tok)
    c = _qcfg(tmp_path / "a")
    assert c["damp_percent"] == 0.05 and c["static_groups"] is True and c["true_sequential"] is False
    assert c["desc_act"] is False and c["act_order"] is True and c["observer"] == "mse"
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "a" / "model.safetensors"))
    g = sd["model.layers.1.mlp.down_proj.g_idx"]
    assert torch.equal(g, torch.arange(192, dtype=torch.int32) // 32)  # static groups: trivial g_idx
    # the settings travel through our own checkpoint too
    save_compressed(q, tmp_path / "ours", tok)
    save_gptq(load_compressed(tmp_path / "ours"), tmp_path / "b", tok)
    assert _qcfg(tmp_path / "b") == c
    # another run, other values; dynamic act-order groups are desc_act
    q2 = gptq_model(copy.deepcopy(model), GPTQConfig(QuantScheme(bits=4, group_size=32, scale_dtype="float16"),
                                                     act_order=True), calib)
    save_gptq(q2, tmp_path / "c", tok)
    c2 = _qcfg(tmp_path / "c")
    assert c2["damp_percent"] == 0.01 and c2["static_groups"] is False and c2["true_sequential"] is True
    assert c2["desc_act"] is True and c2["observer"] == "minmax"
    # RTN layers: no GPTQ settings are claimed
    save_gptq(_rtn(model, 64), tmp_path / "d", tok)
    c3 = _qcfg(tmp_path / "d")
    assert c3["desc_act"] is False and c3["quantizer"] == "rtn"
    assert "damp_percent" not in c3 and "true_sequential" not in c3


@pytest.mark.parametrize("recipe", ["w4-gptq-g128", "w3-gptq-g128"])
def test_bundled_act_order_recipes_use_static_groups(base, tmp_path, recipe):
    # issue 21 item 2: act-order with dynamic groups (desc_act) is what vLLM refuses; the bundled recipes
    # process columns in activation order with per-contiguous-group parameters (trivial g_idx)
    from torchcompress.nn.gptq_linear import GPTQLinear
    from torchcompress.recipe import load_recipe

    stage = load_recipe(recipe).stages[0]
    cfg = stage.config
    assert cfg.act_order and cfg.static_groups
    model, tok, calib = base
    small = GPTQConfig(QuantScheme(**{**cfg.scheme.to_dict(), "group_size": 64}), block_size=cfg.block_size,
                       damp=cfg.damp, act_order=cfg.act_order, static_groups=cfg.static_groups, mse=cfg.mse)
    q = gptq_model(copy.deepcopy(model), small, calib)
    assert not any(isinstance(m, GPTQLinear) for m in q.modules())
    if cfg.scheme.symmetric:
        save_gptq(q, tmp_path / "g", tok)
        assert _qcfg(tmp_path / "g")["desc_act"] is False
