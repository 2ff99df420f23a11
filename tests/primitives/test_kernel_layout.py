"""The K-major (pre-shuffled) working copy of packed codes: exact round trip, never in what is saved."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn as nn

import torchcompress as tc
from torchcompress.config import QuantScheme
from torchcompress.errors import ConfigError
from torchcompress.nn.quant_linear import QuantLinear
from torchcompress.primitives.kernel_layout import from_kmajor, kmajor_supported, to_kmajor
from torchcompress.primitives.packing import pack, unpack


@pytest.mark.parametrize("bits,k", [(4, 128), (2, 48), (8, 20), (4, 8)])
def test_round_trip_and_word_order(bits, k):
    codes = torch.randint(0, 1 << bits, (7, k), dtype=torch.uint8)
    qw = pack(codes, bits)
    qkn = to_kmajor(qw, bits, k)
    w = 32 // bits
    assert qkn.shape == (k // w, 7) and qkn.dtype == torch.int32 and qkn.is_contiguous()
    assert torch.equal(from_kmajor(qkn, bits, k), qw)
    # word (j, n) holds codes j*W .. j*W+W-1 of row n, code i at bits [i*b, (i+1)*b)
    j, n = k // w - 1, 3
    word = int(qkn[j, n]) & 0xFFFFFFFF
    assert [(word >> (i * bits)) & ((1 << bits) - 1) for i in range(w)] == codes[n, j * w:(j + 1) * w].tolist()


def test_refuses_rows_that_are_not_whole_words():
    assert not kmajor_supported(3, 64, 32) and not kmajor_supported(4, 100, 32) and not kmajor_supported(4, 64, 12)
    assert kmajor_supported(4, 4096, 128)
    with pytest.raises(ConfigError, match="qweight"):
        to_kmajor(pack(torch.zeros(2, 100, dtype=torch.uint8), 4), 4, 100)
    with pytest.raises(ConfigError, match="qweight_kn"):
        from_kmajor(torch.zeros(3, 2, dtype=torch.int32), 4, 100)
    with pytest.raises(ConfigError, match="kernel_layout"):
        QuantLinear.from_linear(nn.Linear(100, 4), QuantScheme(bits=4, group_size=32)).use_kmajor_layout()


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    tc.quantize_(m, QuantScheme(bits=4, group_size=32, symmetric=False))
    return m


def test_saved_checkpoint_is_byte_identical_and_reloads(tmp_path):
    plain, shuffled = _model(), _model()
    for mod in shuffled.modules():
        if isinstance(mod, QuantLinear):
            mod.use_kmajor_layout()
            assert torch.equal(unpack(from_kmajor(mod._qweight_kn, 4, mod.in_features), 4, mod.in_features),
                               unpack(mod.qweight, 4, mod.in_features))
    assert list(plain.state_dict()) == list(shuffled.state_dict())  # no new keys
    tc.save_compressed(plain, tmp_path / "a")
    tc.save_compressed(shuffled, tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        if name.endswith(".safetensors"):
            # the tensor bytes are identical; the JSON header is compared parsed: safetensors writes its
            # __metadata__ map in an order that varies from one save to the next (seen with two saves of
            # one unshuffled model: bytes 26-33 of the file differ)
            ha, hb = int.from_bytes(a[:8], "little"), int.from_bytes(b[:8], "little")
            assert json.loads(a[8:8 + ha]) == json.loads(b[8:8 + hb]), name
            assert a[8 + ha:] == b[8 + hb:], name
        else:
            assert a == b, name
    # and the same tensor bytes as before the layout existed: sha256 of the data section, measured with
    # commit ee46269 (the same seed, scheme and torch)
    data = (tmp_path / "b" / "model.safetensors").read_bytes()
    data = data[8 + int.from_bytes(data[:8], "little"):]
    assert hashlib.sha256(data).hexdigest() == "35371f8395a54848bf1fb5f29f03e3cb36e5d5c425a98fb7e8d27553a45451bb"
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    back = tc.load_compressed(tmp_path / "b", skeleton)
    back[0].use_kmajor_layout()
    assert torch.equal(back[0]._qweight_kn, shuffled[0]._qweight_kn)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(back(x), plain(x))


def test_layout_follows_load_state_dict_and_repacking():
    a, b = _model(), _model()
    with torch.no_grad():
        b[0].qweight.copy_(torch.randint(0, 255, b[0].qweight.shape, dtype=torch.uint8))
    a[0].use_kmajor_layout()
    a.load_state_dict(b.state_dict())  # copies into qweight in place: the post hook rebuilds the copy
    assert torch.equal(from_kmajor(a[0]._qweight_kn, 4, 128), b[0].qweight)
    a[0].unfreeze()
    assert a[0]._qweight_kn is None
    a[0].freeze()
    assert torch.equal(from_kmajor(a[0]._qweight_kn, 4, 128), a[0].qweight)
    a[0].use_kmajor_layout(False)
    assert a[0]._qweight_kn is None
