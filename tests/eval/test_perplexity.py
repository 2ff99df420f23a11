import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import TINY_TEXT, make_tokenizer, tiny_config
from torchcompress.errors import InputError
from torchcompress.eval.perplexity import evaluate, make_windows
from torchcompress.eval.text import load_text

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def tok_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer()
    return tok, LlamaForCausalLM(tiny_config(vocab_size=len(tok))).eval()


def test_windows_are_consecutive_slices(tok_model):
    tok, _ = tok_model
    w = make_windows(tok, TINY_TEXT, 16, 5)
    ids = tok(TINY_TEXT, add_special_tokens=False).input_ids
    assert w.ids.shape == (5, 16)
    assert w.ids.flatten().tolist() == ids[:80]
    many = make_windows(tok, TINY_TEXT, 16, 10**6)  # capped by the text
    assert many.ids.shape[0] == len(ids) // 16


def test_window_errors(tok_model):
    tok, _ = tok_model
    with pytest.raises(InputError, match="fewer than one window"):
        make_windows(tok, "hi", 512, 1, "short.txt")
    with pytest.raises(InputError, match="seq-len"):
        make_windows(tok, TINY_TEXT, 1, 1)
    with pytest.raises(InputError, match="windows"):
        make_windows(tok, TINY_TEXT, 16, 0)


def test_perplexity_matches_transformers_loss(tok_model):
    # oracle: transformers' own causal-LM loss (mean NLL over the L-1 predicted tokens per window)
    tok, model = tok_model
    w = make_windows(tok, TINY_TEXT, 24, 4)
    res = evaluate(model, w, batch_size=3)
    with torch.no_grad():
        losses = [model(input_ids=row[None], labels=row[None]).loss.item() for row in w.ids]
    assert res.tokens == 4 * 23
    assert res.perplexity == pytest.approx(math.exp(sum(losses) / 4), rel=1e-5)


def test_kl_and_top1_against_reference(tok_model):
    tok, model = tok_model
    w = make_windows(tok, TINY_TEXT, 24, 3)
    same = evaluate(model, w, ref_model=model)
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert same.top1_agreement == 1.0
    assert same.perplexity_ref == pytest.approx(same.perplexity)

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    res = evaluate(other, w, ref_model=model)
    with torch.no_grad():
        lp = F.log_softmax(other(input_ids=w.ids).logits[:, :-1].float(), -1)
        lq = F.log_softmax(model(input_ids=w.ids).logits[:, :-1].float(), -1)
    kl = F.kl_div(lp, lq, log_target=True, reduction="sum").item() / lp[..., 0].numel()
    assert res.kl_divergence == pytest.approx(kl, rel=1e-4)
    agree = (lp.argmax(-1) == lq.argmax(-1)).float().mean().item()
    assert res.top1_agreement == pytest.approx(agree)
    assert res.kl_divergence > 0


def test_load_text(tmp_path):
    text, desc = load_text("pydoc")
    assert len(text) > 100_000 and "pydoc" in desc
    assert load_text("pydoc")[0] == text  # deterministic
    with pytest.raises(InputError, match="not found"):
        load_text(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf8 \xff")
    with pytest.raises(InputError, match="not UTF-8"):
        load_text(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        load_text(empty)
