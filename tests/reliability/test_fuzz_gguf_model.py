"""Lying GGUF metadata through the model importer: hyperparameters that disagree with the tensors.

A tiny Llama exported by us is re-encoded with one metadata value replaced (same key, any type and
value); :func:`load_gguf_model` must raise FormatError or return a model that runs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.reliability._fuzz import fuzz, no_hang
from torchcompress.errors import InputError
from torchcompress.formats.gguf_file import KV, TensorPlan, VType, encode_header
from torchcompress.formats.gguf_load import load_gguf_model
from torchcompress.formats.gguf_read import read_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.tiny import make_tokenizer, tiny_config
    from torchcompress.formats.gguf_write import export_gguf

    tok = make_tokenizer(300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=64, intermediate_size=128)).eval()
    p = tmp_path_factory.mktemp("gguf-model") / "tiny.gguf"
    export_gguf(model, tok, p, "Q8_0")
    g = read_gguf(p)
    plans = [TensorPlan(t.name, t.shape, t.qtype) for t in g.tensors.values()]
    data = p.read_bytes()[g.data_offset:]
    return _Exported(path=p, kv=g.kv, plans=plans, data=data, alignment=g.alignment)


class _Exported:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __repr__(self):
        return "<exported tiny gguf>"


_HYPER = ["llama.embedding_length", "llama.feed_forward_length", "llama.block_count", "llama.attention.head_count",
          "llama.attention.head_count_kv", "llama.context_length", "llama.attention.layer_norm_rms_epsilon",
          "llama.rope.freq_base", "llama.rope.dimension_count", "general.architecture", "tokenizer.ggml.bos_token_id",
          "tokenizer.ggml.eos_token_id", "llama.attention.key_length"]


def _values():
    ints = st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 63, 64, 65, 128, 4096, 2**31 - 1, 2**32 - 1]) | st.integers(0, 300)
    return st.one_of(
        st.tuples(st.sampled_from([VType.UINT32, VType.INT32, VType.UINT64, VType.UINT8]), ints),
        st.tuples(st.just(VType.INT32), st.integers(-(2**31), -1)),
        st.tuples(st.sampled_from([VType.FLOAT32, VType.FLOAT64]),
                  st.floats(allow_nan=True, allow_infinity=True, width=32)),
        st.tuples(st.just(VType.STRING), st.sampled_from(["llama", "gpt2", "", "{{ 7*7 }}"])),
        st.tuples(st.just(VType.BOOL), st.booleans()),
    )


@fuzz(40)
@given(key=st.sampled_from(_HYPER), value=_values(), drop=st.booleans())
def test_fuzz_hyperparameters(exported, tmp_path_factory, key, value, drop):
    vtype, v = value
    if vtype in (VType.UINT8,) and not 0 <= v < 256 or vtype == VType.UINT32 and v >= 2**32:
        v = v % 256 if vtype == VType.UINT8 else v % 2**32
    if vtype == VType.INT32 and v >= 2**31:
        v -= 2**32
    kvs = [kv for k, kv in exported.kv.items() if not (drop and k == key)]
    if not drop:
        kvs = [KV(k.key, vtype, v) if k.key == key else k for k in kvs]
        if key not in exported.kv:
            kvs.append(KV(key, vtype, v))
    header, _ = encode_header(kvs, exported.plans, exported.alignment)
    p = tmp_path_factory.getbasetemp() / "lying.gguf"
    p.write_bytes(header + exported.data)
    refused = None
    with no_hang(20):
        try:
            model = load_gguf_model(p)
        except InputError as e:  # one of the two outcomes the invariant allows: a typed error with a message
            refused = e
        else:
            with torch.no_grad():
                out = model(torch.tensor([[1, 2, 3]])).logits
    if refused is not None:
        assert str(refused)
    else:  # the other: a model that runs
        assert out.shape[:2] == (1, 3)


def test_unmodified_export_loads(exported):
    assert load_gguf_model(exported.path) is not None
