"""Calibration data: determinism, self-sampling cache, mixing, short documents, sources and errors."""

import json

import pytest
import torch

from torchcompress.calibration import (CalibrationConfig, CalibrationDataError, SelfGenConfig, build_calibration,
                                       parse_sources)
from torchcompress.calibration import selfgen as selfgen_mod
from torchcompress.calibration.data import allocate
from torchcompress.errors import ConfigError


@pytest.fixture(scope="module")
def tok():
    from tests.tiny import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaForCausalLM

    from tests.tiny import tiny_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(vocab_size=len(tok))).eval()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHCOMPRESS_CACHE", str(tmp_path / "cache"))


def _files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("quick brown fox " * 200)
    b.write_text("lazy dog " * 200)
    return a, b


def test_same_seed_same_tokens(tmp_path, tok, model):
    a, b = _files(tmp_path)
    cfg = CalibrationConfig(sources=(str(a), str(b), "pydoc"), num_samples=12, seq_len=24, seed=3)
    one, two = build_calibration(cfg, model, tok), build_calibration(cfg, model, tok)
    assert torch.equal(one.input_ids, two.input_ids) and one.sha256() == two.sha256()
    other = build_calibration(CalibrationConfig(sources=("pydoc",), num_samples=12, seq_len=24, seed=4), model, tok)
    same_src = build_calibration(CalibrationConfig(sources=("pydoc",), num_samples=12, seq_len=24, seed=3), model, tok)
    assert not torch.equal(other.input_ids, same_src.input_ids)


def test_self_sampling_cached_second_run_generates_nothing(tok, model, monkeypatch):
    calls = []
    real = selfgen_mod.generate
    monkeypatch.setattr(selfgen_mod, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = CalibrationConfig(sources=("self",), num_samples=5, seq_len=16,
                            selfgen=SelfGenConfig(batch_size=2, temperature=0.8))
    first = build_calibration(cfg, model, tok)
    assert calls == [1]
    second = build_calibration(cfg, model, tok)
    assert calls == [1], "the second run must read the cache"
    assert torch.equal(first.input_ids, second.input_ids)
    assert first.input_ids[:, 0].eq(tok.eos_token_id).all()  # tiny tokenizer: no BOS, so samples start at EOS
    # a different seed or setting is a different cache entry
    build_calibration(CalibrationConfig(sources=("self",), num_samples=5, seq_len=16, seed=1,
                                        selfgen=SelfGenConfig(batch_size=2, temperature=0.8)), model, tok)
    assert calls == [1, 1]


def test_generation_batches_do_not_change_samples(tok, model):
    a = selfgen_mod.generate(model, [0], SelfGenConfig(num_samples=4, seq_len=10, batch_size=4, seed=7))
    b = selfgen_mod.generate(model, [0], SelfGenConfig(num_samples=4, seq_len=10, batch_size=4, seed=7))
    assert torch.equal(a, b) and a.shape == (4, 10)


def test_mixing_proportions(tmp_path, tok, model):
    a, b = _files(tmp_path)
    assert allocate(10, (3.0, 1.0)) == [8, 2] and allocate(7, (1, 1, 1)) == [3, 2, 2] and sum(allocate(128, (0.3, 0.7))) == 128
    names, weights = parse_sources(f"{a}@3,{b}@1")
    calib = build_calibration(CalibrationConfig(sources=names, weights=weights, num_samples=40, seq_len=8), model, tok)
    fox = set(tok(a.read_text(), add_special_tokens=False).input_ids) - set(tok(b.read_text(), add_special_tokens=False).input_ids)
    from_a = sum(bool(set(row.tolist()) & fox) for row in calib.input_ids)
    assert from_a == 30
    assert [s["samples"] for s in calib.describe()["sources"]] == [30, 10]
    # interleaved, not 30 then 10
    first_rows = [bool(set(r.tolist()) & fox) for r in calib.input_ids[:10]]
    assert not all(first_rows)


def test_short_documents_are_masked_not_padded_into_the_data(tmp_path, tok, model):
    short = tmp_path / "short.txt"
    short.write_text("lazy dog")
    n_tok = len(tok("lazy dog", add_special_tokens=False).input_ids)
    calib = build_calibration(CalibrationConfig(sources=(str(short),), num_samples=3, seq_len=32), model, tok)
    assert calib.lengths.tolist() == [n_tok] * 3
    assert calib.attention_mask[:, n_tok:].eq(0).all() and calib.num_tokens == 3 * n_tok
    # packing joins short documents with EOS into full-length samples instead
    packed = build_calibration(CalibrationConfig(sources=(str(short),), num_samples=2, seq_len=32, mode="packed"), model, tok)
    assert packed.lengths.tolist() == [32, 32]
    assert (packed.input_ids == tok.eos_token_id).any()


def test_offline_dataset_is_a_clear_error(tok, model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationDataError, match="hf:wikitext"):
        build_calibration(CalibrationConfig(sources=("hf:wikitext:train:text",), num_samples=2, seq_len=8), model, tok)
    with pytest.raises(CalibrationDataError, match="hf:NAME"):
        build_calibration(CalibrationConfig(sources=("hf:",), num_samples=2, seq_len=8), model, tok)


def test_chat_conversations_rendered_with_template(tmp_path, tok, model):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    conv = tmp_path / "chat.jsonl"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "the quick fox"},
                                             {"role": "assistant", "content": "the lazy dog"}]}) + "\n")
    calib = build_calibration(CalibrationConfig(sources=(str(conv),), num_samples=1, seq_len=64), model, t)
    text = t.decode(calib.input_ids[0, : int(calib.lengths[0])])
    assert text == "<user>the quick fox\n<assistant>the lazy dog\n"
    with pytest.raises(CalibrationDataError, match="chat template"):
        build_calibration(CalibrationConfig(sources=(str(conv),), num_samples=1, seq_len=8), model, tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(CalibrationDataError, match="bad.jsonl:1"):
        build_calibration(CalibrationConfig(sources=(str(bad),), num_samples=1, seq_len=8), model, t)


def test_pretokenized_and_glob(tmp_path, tok, model):
    from safetensors.torch import save_file

    ids = torch.arange(40).view(2, 20) % 100
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 5:] = 0
    p = tmp_path / "ids.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask}, str(p))
    calib = build_calibration(CalibrationConfig(sources=(str(p),), num_samples=6, seq_len=20, mode="packed"), model, tok)
    assert calib.lengths.tolist() == [20] * 6
    _files(tmp_path)
    g = build_calibration(CalibrationConfig(sources=(str(tmp_path / "*.txt"),), num_samples=4, seq_len=8), model, tok)
    assert "2 text file(s)" in g.sources[0]["description"]
    with pytest.raises(CalibrationDataError, match="matches no file"):
        build_calibration(CalibrationConfig(sources=(str(tmp_path / "*.md"),), num_samples=1, seq_len=8), model, tok)
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(CalibrationDataError, match="unreadable safetensors"):
        build_calibration(CalibrationConfig(sources=(str(tmp_path / "pickle.safetensors"),), num_samples=1, seq_len=8), model, tok)


def test_config_validation():
    with pytest.raises(ConfigError, match="weights"):
        CalibrationConfig(sources=("a", "b"), weights=(1.0,))
    with pytest.raises(ConfigError, match="mode"):
        CalibrationConfig(mode="shuffle")
    with pytest.raises(ConfigError, match="num_samples"):
        CalibrationConfig(num_samples=0)
    with pytest.raises(ConfigError, match="calib"):
        parse_sources("a.txt@heavy")


def test_selfgen_start_tokens():
    from transformers import PreTrainedTokenizerFast

    from tests.tiny import make_tokenizer
    from torchcompress.errors import ConfigError

    tok = make_tokenizer()  # no BOS, no document separator: EOS starts
    eos = tok.eos_token_id
    assert selfgen_mod._start_ids(tok, "bos") == [eos] and selfgen_mod._start_ids(tok, "document") == [eos]
    base = tok.backend_tokenizer
    base.add_special_tokens(["<|endoftext|>", "<|im_start|>"])
    chat = PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<|im_start|>", eos_token="<eos>")
    doc = chat.convert_tokens_to_ids("<|endoftext|>")
    assert selfgen_mod._start_ids(chat, "bos") == [chat.bos_token_id]
    assert selfgen_mod._start_ids(chat, "document") == [doc]  # not the chat-role BOS
    assert selfgen_mod._start_ids(chat, "<eos>") == [eos]
    with pytest.raises(ConfigError, match="selfgen.start"):
        selfgen_mod._start_ids(chat, "<nope>")
    assert selfgen_mod._prefix(chat, SelfGenConfig(start="document", prompt="the"))[0] == doc


@pytest.mark.parametrize("mode", ["random", "packed"])
def test_self_samples_each_used_once(tok, model, mode):
    # every generated sample is one calibration row: none repeated, none dropped (issue 20 item 1)
    n = 24
    calib = build_calibration(CalibrationConfig(sources=("self",), num_samples=n, seq_len=12, mode=mode,
                                                selfgen=SelfGenConfig(batch_size=8, temperature=1.0)), model, tok)
    rows = {tuple(r) for r in calib.input_ids.tolist()}
    assert len(rows) == n
    generated = selfgen_mod.generate(model, selfgen_mod._prefix(tok, SelfGenConfig()),
                                     SelfGenConfig(num_samples=n, seq_len=12, batch_size=8, seed=0))
    assert rows == {tuple(r) for r in generated.tolist()}
    assert calib.attention_mask.eq(1).all()
