"""transformers integration: ``import torchcompress.hf`` then ``from_pretrained`` on checkpoints in our own
format. Group size 48 on the tiny Llama's 64/128-wide layers leaves a partial last group, which compressed-tensors
cannot hold, so these checkpoints stay ours (the standard-format default is tested in test_default_format.py)."""

from __future__ import annotations

import json

import pytest
import torch

import torchcompress as tc
from torchcompress import QuantLinear, QuantScheme

pytestmark = pytest.mark.hf


def _save(tmp_path, model, name="m"):
    out = tmp_path / name
    tc.save_compressed(model, out)
    return out


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(bits=4, group_size=48, symmetric=False), QuantScheme(bits=8, group_size=48, scale_dtype="bfloat16")],
    ids=["w4g48-asym", "w8-g48-bf16"],
)
def test_from_pretrained_returns_quantized_model(tmp_path, tiny_llama, token_ids, tied, scheme):
    import torchcompress.hf  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tied=tied)
    tc.quantize_(model, scheme)
    with torch.no_grad():
        ref = model(token_ids).logits
    out = _save(tmp_path, model)

    loaded = AutoModelForCausalLM.from_pretrained(out)
    qls = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert len(qls) == 14
    q = loaded.model.layers[0].mlp.down_proj
    assert type(q) is QuantLinear and q.is_packed and q.scheme == scheme
    src = model.model.layers[0].mlp.down_proj
    assert torch.equal(q.qweight, src.qweight)
    assert torch.equal(q.scale.float(), src.scale.float())
    assert type(loaded.lm_head) is torch.nn.Linear
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert not any(t.is_meta for t in loaded.state_dict().values())
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, ref)


def test_greedy_generation_matches(tmp_path, tiny_llama, token_ids):
    import torchcompress.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    tc.quantize_(model, QuantScheme(bits=4, group_size=48))
    out = _save(tmp_path, model)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(token_ids, **kw), model.generate(token_ids, **kw))


def test_from_pretrained_model_can_be_saved_again(tmp_path, tiny_llama, token_ids):
    import torchcompress.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    tc.quantize_(model, QuantScheme(bits=4, group_size=48, symmetric=False))
    with torch.no_grad():
        ref = model(token_ids).logits
    first = AutoModelForCausalLM.from_pretrained(_save(tmp_path, model, "a")).eval()
    again = tc.load_compressed(_save(tmp_path, first, "b"))
    with torch.no_grad():
        assert torch.equal(again(token_ids).logits, ref)


def test_register_is_idempotent():
    from transformers.quantizers import auto

    from torchcompress.formats.hf import register

    import torchcompress.hf  # noqa: F401

    cfg_cls = auto.AUTO_QUANTIZATION_CONFIG_MAPPING["torchcompress"]
    q_cls = auto.AUTO_QUANTIZER_MAPPING["torchcompress"]
    register()
    register()
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["torchcompress"] is cfg_cls
    assert auto.AUTO_QUANTIZER_MAPPING["torchcompress"] is q_cls


def test_from_pretrained_rejects_other_format_version(tmp_path, tiny_llama):
    import torchcompress.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    tc.quantize_(model, QuantScheme(bits=4, group_size=48))
    out = _save(tmp_path, model)
    p = out / "config.json"
    cfg = json.loads(p.read_text())
    cfg["quantization_config"]["format_version"] = 99
    p.write_text(json.dumps(cfg))
    with pytest.raises(tc.FormatError) as ei:
        AutoModelForCausalLM.from_pretrained(out)
    assert "format_version" in str(ei.value)


def test_empty_hf_model_bad_config(tmp_path):
    from torchcompress.formats.hf import empty_hf_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(tc.FormatError):
        empty_hf_model(tmp_path)
