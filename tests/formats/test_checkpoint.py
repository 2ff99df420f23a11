"""safetensors checkpoint: bit-identical round trips, and typed errors for every broken file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import torchcompress as tc
from torchcompress import QATConfig, QuantLinear, QuantScheme
from torchcompress.errors import FormatError
from torchcompress.formats.checkpoint import FORMAT_VERSION, MANIFEST_NAME, WEIGHTS_NAME


def make_seq():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 40), nn.GELU(), nn.Linear(40, 10))


def quantized_seq():
    model = make_seq()
    # mixed schemes in one model: each module's manifest entry must carry its own
    tc.quantize_(model, QuantScheme(bits=4, group_size=32, symmetric=False), targets=["0"])
    tc.quantize_(model, QuantScheme(bits=3, granularity="channel", scale_dtype="bfloat16"), targets=["2"])
    tc.quantize_(model, QuantScheme(bits=8, granularity="tensor", scale_dtype="float32"), targets=["4"])
    return model.eval()


def skeleton(meta: bool = True):
    if meta:
        with torch.device("meta"):
            return make_seq()
    return make_seq()


def x_in():
    return torch.randn(5, 48, generator=torch.Generator().manual_seed(9))


@pytest.fixture
def saved_seq(tmp_path):
    model = quantized_seq()
    out = tmp_path / "ckpt"
    tc.save_compressed(model, out)
    with torch.no_grad():
        ref = model(x_in())
    return out, ref


def assert_no_pickle(directory: Path):
    for f in directory.rglob("*"):
        if f.is_file():
            assert f.suffix in {".json", ".safetensors"}, f
            head = f.read_bytes()[:2]
            assert not head.startswith(b"\x80") and head != b"PK", f  # pickle protocol / torch zip


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta", [True, False], ids=["meta-skeleton", "real-skeleton"])
def test_sequential_round_trip_bit_identical(saved_seq, meta):
    out, ref = saved_seq
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, WEIGHTS_NAME])
    assert_no_pickle(out)
    loaded = tc.load_compressed(out, skeleton(meta))
    assert not loaded.training
    assert [type(loaded[i]) for i in (0, 2, 4)] == [QuantLinear] * 3
    assert loaded[0].scheme == QuantScheme(bits=4, group_size=32, symmetric=False)
    assert loaded[2].scale.dtype == torch.bfloat16 and loaded[4].scale.dtype == torch.float32
    assert not any(t.is_meta for t in loaded.state_dict().values())
    with torch.no_grad():
        assert torch.equal(loaded(x_in()), ref)
    src = quantized_seq().state_dict()
    got = loaded.state_dict()
    assert src.keys() == got.keys()
    for k in src:
        assert src[k].dtype == got[k].dtype and torch.equal(src[k], got[k]), k


def test_manifest_contents(saved_seq):
    out, _ = saved_seq
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["quant_method"] == "torchcompress"
    assert manifest["format_version"] == FORMAT_VERSION
    assert sorted(manifest["modules"]) == ["0", "2", "4"]
    e = manifest["modules"]["0"]
    assert e["type"] == "QuantLinear" and e["in_features"] == 48 and e["out_features"] == 64 and e["bias"] is True
    assert QuantScheme.from_dict(e["scheme"]) == QuantScheme(bits=4, group_size=32, symmetric=False)


def test_save_overwrites_existing_output(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    model = quantized_seq()
    tc.save_compressed(model, out)
    assert not (out / "stale.bin").exists()
    with torch.no_grad():
        assert torch.equal(tc.load_compressed(out, skeleton())(x_in()), model(x_in()))


def test_fake_quant_model_refuses_to_save(tmp_path):
    model = make_seq()
    tc.quantize_(model, QATConfig(QuantScheme(bits=4, group_size=16)))
    out = tmp_path / "ckpt"
    with pytest.raises(FormatError) as ei:
        tc.save_compressed(model, out)
    msg = str(ei.value)
    assert "fake-quant" in msg and "freeze_" in msg
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp directory left behind
    tc.freeze_(model)
    tc.save_compressed(model, out)
    with torch.no_grad():
        assert torch.equal(tc.load_compressed(out, skeleton())(x_in()), model(x_in()))


def test_unquantized_model_round_trips(tmp_path):
    model = make_seq().eval()
    tc.save_compressed(model, tmp_path / "plain")
    loaded = tc.load_compressed(tmp_path / "plain", skeleton())
    with torch.no_grad():
        assert torch.equal(loaded(x_in()), model(x_in()))


# ---------------------------------------------------------------------------------------------
# broken files
# ---------------------------------------------------------------------------------------------


def _edit_manifest(out: Path, fn):
    m = json.loads((out / MANIFEST_NAME).read_text())
    fn(m)
    (out / MANIFEST_NAME).write_text(json.dumps(m))


@pytest.mark.parametrize("cut", [0, 7, 100, -1, -500])
def test_truncated_weights(saved_seq, cut):
    out, _ = saved_seq
    data = (out / WEIGHTS_NAME).read_bytes()
    (out / WEIGHTS_NAME).write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(FormatError) as ei:
        tc.load_compressed(out, skeleton())
    assert WEIGHTS_NAME in str(ei.value)


@pytest.mark.parametrize(
    "blob",
    [
        b"not a safetensors file at all",
        (2**62).to_bytes(8, "little") + b"{}",  # header length far beyond the file
        (10).to_bytes(8, "little") + b"\xff" * 10,  # header is not JSON
        (2).to_bytes(8, "little") + b"[]",
    ],
    ids=["garbage", "huge-header-len", "binary-header", "list-header"],
)
def test_corrupt_weights(saved_seq, blob):
    out, _ = saved_seq
    (out / WEIGHTS_NAME).write_bytes(blob)
    with pytest.raises(FormatError):
        tc.load_compressed(out, skeleton())


def test_corrupted_tensor_offsets(saved_seq):
    # a header whose offsets point past the end of the data
    out, _ = saved_seq
    data = (out / WEIGHTS_NAME).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 10**9]
    h = json.dumps(header).encode()
    (out / WEIGHTS_NAME).write_bytes(len(h).to_bytes(8, "little") + h + data[8 + n :])
    with pytest.raises(FormatError):
        tc.load_compressed(out, skeleton())


def test_missing_weights_file(saved_seq):
    out, _ = saved_seq
    (out / WEIGHTS_NAME).unlink()
    with pytest.raises(FormatError) as ei:
        tc.load_compressed(out, skeleton())
    assert WEIGHTS_NAME in str(ei.value)


@pytest.mark.parametrize("drop", ["0.qweight", "2.scale", "0.zero", "4.bias"])
def test_missing_tensor(saved_seq, drop):
    from safetensors.torch import load_file, save_file

    out, _ = saved_seq
    sd = load_file(str(out / WEIGHTS_NAME))
    del sd[drop]
    save_file(sd, str(out / WEIGHTS_NAME))
    with pytest.raises(FormatError) as ei:
        tc.load_compressed(out, skeleton())
    assert drop in str(ei.value)


def test_unexpected_tensor(saved_seq):
    from safetensors.torch import load_file, save_file

    out, _ = saved_seq
    sd = load_file(str(out / WEIGHTS_NAME))
    sd["2.zero"] = torch.zeros(40, 1, dtype=torch.uint8)  # module 2 is symmetric: no zero point
    save_file(sd, str(out / WEIGHTS_NAME))
    with pytest.raises(FormatError) as ei:
        tc.load_compressed(out, skeleton())
    assert "2.zero" in str(ei.value)


def test_wrong_tensor_shape(saved_seq):
    from safetensors.torch import load_file, save_file

    out, _ = saved_seq
    sd = load_file(str(out / WEIGHTS_NAME))
    sd["0.qweight"] = sd["0.qweight"][:, :-1].contiguous()
    save_file(sd, str(out / WEIGHTS_NAME))
    with pytest.raises(FormatError):
        tc.load_compressed(out, skeleton())


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_format_version(saved_seq, version):
    out, _ = saved_seq

    def edit(m):
        if version is None:
            del m["format_version"]
        else:
            m["format_version"] = version

    _edit_manifest(out, edit)
    with pytest.raises(FormatError) as ei:
        tc.load_compressed(out, skeleton())
    assert "format_version" in str(ei.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.pop("modules"),
        lambda m: m.update(modules=["0"]),
        lambda m: m["modules"].update({"7": m["modules"]["0"]}),  # no such module
        lambda m: m["modules"]["0"].update(type="Evil"),
        lambda m: m["modules"].update({"0": "QuantLinear"}),
        lambda m: m["modules"]["0"].pop("in_features"),
        lambda m: m["modules"]["0"]["scheme"].update(bits=9),
        lambda m: m["modules"]["0"]["scheme"].update(unknown_key=1),
        lambda m: m["modules"]["0"].update(in_features=96),  # tensor shapes no longer match
        lambda m: m["modules"]["2"]["scheme"].update(symmetric=False),  # expects a zero tensor
    ],
    ids=["no-modules", "modules-list", "unknown-module", "unknown-type", "entry-not-dict", "missing-field",
         "bad-bits", "unknown-scheme-key", "wrong-in-features", "wrong-symmetry"],
)
def test_bad_manifest(saved_seq, edit):
    out, _ = saved_seq
    _edit_manifest(out, edit)
    with pytest.raises(FormatError):
        tc.load_compressed(out, skeleton())


@pytest.mark.parametrize(
    "tied",
    [{"4.bias": "9.bias"}, {"4.bias": "0.nothing"}, {"4.bias": "0.bias"}, ["4.bias"]],
    ids=["source-module-missing", "source-attr-missing", "source-shape-mismatch", "not-a-mapping"],
)
def test_hostile_tied_entries(saved_seq, tied):
    # "tied" can excuse a missing tensor; a source that does not exist (or cannot stand in for the
    # tensor: 0.bias is (64,), 4.bias is (10,)) must be a FormatError, not a raw AttributeError
    # from deep inside the loader or a model that fails later in forward
    from safetensors.torch import load_file, save_file

    out, _ = saved_seq
    sd = load_file(str(out / WEIGHTS_NAME))
    del sd["4.bias"]
    save_file(sd, str(out / WEIGHTS_NAME))
    _edit_manifest(out, lambda m: m.update(tied=tied))
    with pytest.raises(FormatError):
        tc.load_compressed(out, skeleton())


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"], ids=["bad-json", "not-object", "binary"])
def test_unreadable_manifest(saved_seq, text):
    out, _ = saved_seq
    (out / MANIFEST_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(FormatError) as ei:
        tc.load_compressed(out, skeleton())
    assert MANIFEST_NAME in str(ei.value)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FormatError):
        tc.load_compressed(tmp_path, skeleton())
    with pytest.raises(FormatError):
        tc.load_compressed(tmp_path / "does-not-exist", skeleton())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FormatError):  # a plain HF dir without our quantization_config
        tc.load_compressed(tmp_path, skeleton())


def test_load_never_unpickles(saved_seq, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    out, ref = saved_seq
    with torch.no_grad():
        assert torch.equal(tc.load_compressed(out, skeleton())(x_in()), ref)


# ---------------------------------------------------------------------------------------------
# tiny Llama
# ---------------------------------------------------------------------------------------------


@pytest.mark.hf
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_round_trip_bit_identical(tmp_path, tiny_llama, token_ids, tied):
    model = tiny_llama(tied=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    tc.quantize_(model, QuantScheme(bits=4, group_size=48, symmetric=False))  # partial groups: our own format
    with torch.no_grad():
        ref = model(token_ids).logits
    out = tmp_path / "llama"
    tc.save_compressed(model, out)
    assert_no_pickle(out)
    assert not (out / MANIFEST_NAME).exists()
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "torchcompress" and qc["format_version"] == FORMAT_VERSION
    assert len(qc["modules"]) == 14
    if tied:
        assert qc["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) != tied  # a tied head is stored once

    loaded = tc.load_compressed(out)
    assert type(loaded.model.layers[1].self_attn.q_proj) is QuantLinear
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert not any(t.is_meta for t in loaded.state_dict().values())
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, ref)


@pytest.mark.hf
def test_llama_wrong_format_version_in_config(tmp_path, tiny_llama):
    model = tiny_llama()
    tc.quantize_(model, QuantScheme(bits=4, group_size=48))  # partial groups: our own format
    tc.save_compressed(model, tmp_path / "m")
    p = tmp_path / "m" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    p.write_text(json.dumps(cfg))
    with pytest.raises(FormatError) as ei:
        tc.load_compressed(tmp_path / "m")
    assert "format_version" in str(ei.value)


@pytest.mark.hf
def test_plain_checkpoint_without_skeleton_is_a_format_error(saved_seq):
    out, _ = saved_seq
    with pytest.raises(FormatError):
        tc.load_compressed(out)  # no config.json to rebuild from
