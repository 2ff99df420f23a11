"""QLoRA: LoRA adapters on a frozen 4-bit base train, the base never changes, memory is lower."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny import TINY_TEXT, make_tokenizer, tiny_config
from torchcompress import QuantLinear, QuantScheme, load_compressed, quantize_, save_compressed
from torchcompress.api import add_lora_
from torchcompress.eval.size import model_bytes
from torchcompress.lowrank import LoRAConfig
from torchcompress.lowrank.lora import lora_modules, lora_parameters, merge_lora_
from torchcompress.nn.lora_linear import LoRALinear

pytestmark = [pytest.mark.hf, pytest.mark.slow]  # ~40 s on a quiet 2-core machine, minutes when loaded
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config():
    return tiny_config(vocab_size=257, hidden_size=128, intermediate_size=256)


def _setup():
    from transformers import LlamaForCausalLM

    tok = make_tokenizer()
    assert len(tok) == 257
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    ids = torch.tensor(tok(TINY_TEXT)["input_ids"])
    n = ids.numel() // 32
    return model, ids[: n * 32].reshape(n, 32)


def _loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def test_qlora_trains_adapters_only_and_lowers_loss(tmp_path):
    model, data = _setup()
    float_bytes = model_bytes(model)
    quantize_(model, QuantScheme(bits=4, group_size=32, symmetric=False))
    torch.manual_seed(1)
    add_lora_(model, LoRAConfig(targets=ALL, r=8, alpha=16))
    assert len(lora_modules(model)) == 14 and all(isinstance(m.base_layer, QuantLinear) for _, m in lora_modules(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    base_state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    # resident bytes: packed 4-bit bases + adapters vs the float model (embeddings stay float in both)
    assert model_bytes(model) < 0.5 * float_bytes  # measured 0.335 for this shape

    opt = torch.optim.AdamW(lora_parameters(model), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    held_out = data[-4:]
    model.eval()
    with torch.no_grad():
        before = float(_loss(model, held_out))
    model.train()
    for _ in range(15):
        batch = data[torch.randint(0, data.shape[0] - 4, (4,), generator=g)]
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == ("lora_" in name), name  # nothing outside the adapters gets a gradient
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(_loss(model, held_out))
    assert after < 0.93 * before  # measured 5.607 -> 4.918 (held-out windows of the same text, random-init base)
    for k, v in model.state_dict().items():
        if k in base_state:
            assert torch.equal(v, base_state[k]), k  # the frozen base is untouched

    # a QLoRA model saves and loads as our checkpoint (adapters unmerged on a packed base)
    save_compressed(model, tmp_path / "ck")
    back = load_compressed(tmp_path / "ck")  # an HF model: config.json rebuilds the skeleton
    assert isinstance(back.model.layers[0].self_attn.q_proj, LoRALinear)
    assert isinstance(back.model.layers[0].self_attn.q_proj.base_layer, QuantLinear)
    with torch.no_grad():
        assert float(_loss(back, held_out)) == after

    # merging re-quantizes into 4-bit layers again and says what that cost
    merged = copy.deepcopy(model)
    errors = merge_lora_(merged)
    assert not lora_modules(merged)
    assert all(e is not None and e.base_kind == "QuantLinear" for e in errors.values())
    with torch.no_grad():
        after_merge = float(_loss(merged, held_out))
    assert abs(after_merge - after) < 0.05  # measured 4.9181 -> 4.9178: re-quantization costs ~nothing here
