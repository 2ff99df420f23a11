"""GGUF import: GGUFLinear models vs the source model and vs transformers' own GGUF loader; hostile files."""

from __future__ import annotations

import random
import struct

import pytest
import torch

from tests.tiny import make_tokenizer, tiny_config
from torchcompress.errors import FormatError
from torchcompress.formats.gguf_load import load_gguf_model
from torchcompress.formats.gguf_read import read_gguf
from torchcompress.formats.gguf_write import export_gguf
from torchcompress.nn.gguf_linear import GGUFEmbedding, GGUFLinear
from torchcompress.primitives.gguf_common import GGMLType as G

pytest.importorskip("gguf")


def _model(tied: bool, hidden: int = 256):
    from transformers import LlamaForCausalLM

    tok = make_tokenizer(300)
    cfg = tiny_config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.mark.parametrize("tied", [False, True])
def test_f32_roundtrip_is_exact(tmp_path, tied):
    model, tok = _model(tied)
    export_gguf(model, tok, tmp_path / "m.gguf", "F32")
    back = load_gguf_model(tmp_path / "m.gguf")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize("qtype", ["Q8_0", pytest.param("Q4_K_M", marks=pytest.mark.slow)])
def test_quantized_import_keeps_blocks_and_matches_transformers(tmp_path, qtype):
    from transformers import AutoModelForCausalLM

    model, tok = _model(tied=True)
    res = export_gguf(model, tok, tmp_path / "m.gguf", qtype)
    ours = load_gguf_model(tmp_path / "m.gguf")
    q = ours.model.layers[1].self_attn.q_proj
    assert isinstance(q, GGUFLinear) and q.qtype == res.types["blk.1.attn_q.weight"]
    assert isinstance(ours.model.embed_tokens, GGUFEmbedding)
    assert ours.lm_head.blocks.data_ptr() == ours.model.embed_tokens.blocks.data_ptr()  # tied bytes, once
    # no float copy of any quantized weight
    assert not any(p.numel() > 256 for p in ours.parameters())
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_gguf_linear_op_grad_and_compile():
    lin = torch.nn.Linear(256, 32)
    g = GGUFLinear.from_linear(lin, G.Q6_K)
    x = torch.randn(3, 256, requires_grad=True)
    y = g(x)
    w = g.dequantize()
    torch.testing.assert_close(y, x @ w.T + lin.bias)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, -1))
    out = torch.library.opcheck(torch.ops.torchcompress.gguf_linear.default, (x.detach(), g.blocks, g.bias.detach(), int(G.Q6_K), 256),
                                test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in out.values())


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    model, tok = _model(tied=True, hidden=64)
    p = tmp_path_factory.mktemp("g") / "small.gguf"
    export_gguf(model, tok, p, "Q8_0")
    return p.read_bytes()


def _must_be_ok_or_format_error(path):
    try:
        read_gguf(path)
        load_gguf_model(path)
    except FormatError:
        pass


def test_truncations(tmp_path, small_file):
    p = tmp_path / "t.gguf"
    cuts = sorted({0, 3, 4, 8, 23, 24, 100, len(small_file) // 2, len(small_file) - 1} | {random.Random(1).randrange(len(small_file)) for _ in range(20)})
    for n in cuts:
        p.write_bytes(small_file[:n])
        with pytest.raises(FormatError):
            load_gguf_model(p)


def test_hostile_fields(tmp_path, small_file):
    p = tmp_path / "h.gguf"
    for off, fmt, val in [(8, "<Q", 2**63), (16, "<Q", 2**62), (4, "<I", 99), (0, "<4s", b"GGUG"),
                          (24, "<Q", 2**60)]:  # tensor count, kv count, version, magic, first key length
        b = bytearray(small_file)
        struct.pack_into(fmt, b, off, val)
        p.write_bytes(bytes(b))
        with pytest.raises(FormatError):
            read_gguf(p)


def test_fuzz_bounded(tmp_path, small_file):
    """200 random corruptions of the header: a typed error or a valid model, never a crash or hang."""
    g = small_file
    header_end = read_gguf_header_end(tmp_path, g)
    rng = random.Random(0)
    p = tmp_path / "f.gguf"
    for _ in range(200):
        b = bytearray(small_file)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(header_end)
            b[i] = rng.choice([0, 0xFF, rng.randrange(256), b[i] ^ (1 << rng.randrange(8))])
        p.write_bytes(bytes(b))
        _must_be_ok_or_format_error(p)


def read_gguf_header_end(tmp_path, data: bytes) -> int:
    p = tmp_path / "ok.gguf"
    p.write_bytes(data)
    return read_gguf(p).data_offset
