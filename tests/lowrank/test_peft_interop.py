"""PEFT is the oracle: same seed and config give the same adapters and outputs; files go both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from tests.tiny import tiny_config
from torchcompress import FormatError, InputError
from torchcompress.api import add_lora_
from torchcompress.lowrank import LoRAConfig
from torchcompress.lowrank.lora import lora_modules, merge_lora_
from torchcompress.lowrank.peft_io import load_adapter, save_adapter

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.hf

TARGETS = ("q_proj", "v_proj", "down_proj")


def _model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def _ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


def _randomize_b(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _pair(**kw):
    """(peft model, our model) built from the same seed and config."""
    cfg = dict(r=4, alpha=8, dropout=0.0, use_rslora=False, init="default") | kw
    base = _model()
    ours = copy.deepcopy(base)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(base, peft.LoraConfig(
        r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"], target_modules=list(TARGETS),
        use_rslora=cfg["use_rslora"], init_lora_weights=True if cfg["init"] == "default" else "gaussian"))
    torch.manual_seed(1)
    add_lora_(ours, LoRAConfig(targets=TARGETS, **cfg))
    return theirs, ours


@pytest.mark.parametrize("kw", [{}, {"init": "gaussian"}, {"use_rslora": True, "alpha": 16, "r": 8}])
def test_same_seed_same_adapters_and_outputs(kw):
    theirs, ours = _pair(**kw)
    sd = theirs.state_dict()
    names = [n for n, _ in lora_modules(ours)]
    assert len(names) == 6
    for name, m in lora_modules(ours):
        assert torch.equal(m.lora_A.weight, sd[f"base_model.model.{name}.lora_A.default.weight"])
        assert torch.equal(m.lora_B.weight, sd[f"base_model.model.{name}.lora_B.default.weight"])
    # B starts at zero: give both the same non-zero B so the outputs exercise the update
    _randomize_b(ours)
    _randomize_b(theirs.base_model.model)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}


def test_ours_saved_peft_loads(tmp_path):
    _, ours = _pair(use_rslora=True, alpha=6)
    _randomize_b(ours)
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path="tiny")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(_model(), tmp_path / "ad").eval()
    assert loaded.peft_config["default"].use_rslora
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_peft_saved_ours_loads_and_roundtrips(tmp_path):
    theirs, _ = _pair(alpha=16)
    _randomize_b(theirs.base_model.model)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(_model(), tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        want = theirs(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, rtol=0, atol=0)
    # and back out through our writer: PEFT reads it, same outputs
    save_adapter(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(_model(), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=0)


def test_rank_and_alpha_patterns_survive_both_ways(tmp_path):
    base = _model()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS),
                                                       rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}))
    _randomize_b(theirs.base_model.model)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(_model(), tmp_path / "peft")
    mods = dict(lora_modules(ours))
    assert mods["model.layers.0.mlp.down_proj"].r == 2 and mods["model.layers.1.self_attn.v_proj"].alpha == 3
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)
    save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_model(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, theirs(ids).logits, rtol=0, atol=0)


def test_merge_matches_peft_merge_and_unmerge_restores():
    theirs, ours = _pair()
    _randomize_b(ours)
    _randomize_b(theirs.base_model.model)
    before = {k: v.clone() for k, v in _model().state_dict().items()}
    ids = _ids()
    with torch.no_grad():
        y = ours(ids).logits
        for _, m in lora_modules(ours):
            m.merge()
        ours_merged = ours(ids).logits
        for _, m in lora_modules(ours):
            m.unmerge()
        restored = {k.replace(".base_layer", ""): v for k, v in ours.state_dict().items() if "lora_" not in k}
        merged_peft = theirs.merge_and_unload()
        peft_w = merged_peft.state_dict()
    torch.testing.assert_close(ours_merged, y, rtol=1e-4, atol=1e-5)  # measured max |diff| ~2e-6
    for k, v in before.items():
        torch.testing.assert_close(restored[k], v, rtol=0, atol=1e-6)  # W + d - d: float32 rounding only
    merge_lora_(ours)
    assert not lora_modules(ours)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, peft_w[k], rtol=0, atol=0)


def test_bad_adapter_files(tmp_path):
    _, ours = _pair()
    save_adapter(ours, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(FormatError, match="use_dora"):
        load_adapter(_model(), tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg | {"r": 5}))
    with pytest.raises(FormatError, match="rank 4 in the tensors, 5"):
        load_adapter(_model(), tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(FormatError, match="unreadable safetensors"):
        load_adapter(_model(), tmp_path / "ad")
    small = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(InputError, match="no LoRALinear"):
        save_adapter(small, tmp_path / "x")
    from safetensors.torch import save_file

    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 7),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(96, 4)},
              str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(FormatError, match="do not fit"):
        load_adapter(_model(), tmp_path / "ad")
