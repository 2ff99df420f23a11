"""quantize_ / freeze_: module replacement, targets/ignore, configs, errors, QAT."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchcompress as tc
from torchcompress import QATConfig, QuantLinear, QuantScheme, RTNConfig
from torchcompress.api import DEFAULT_IGNORE
from torchcompress.errors import ConfigError, NumericError
from torchcompress.primitives.affine import fake_quantize


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.up_proj = nn.Linear(d, 2 * d)
        self.down_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        return x + self.down_proj(F.relu(self.up_proj(x)))


class Toy(nn.Module):
    def __init__(self, d=32, vocab=50):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.embed_proj = nn.Linear(d, d)  # a Linear whose name says "embed": skipped by default
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed_proj(self.embed_tokens(ids))
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


LAYER_LINEARS = [f"layers.{i}.{n}" for i in range(2) for n in ("up_proj", "down_proj")]


def quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))


def linear_names(model):
    return sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)


def test_replaces_linears_in_place_and_skips_lm_head_and_embeddings():
    model = Toy()
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids).detach()
    up = model.layers[0].up_proj
    out = tc.quantize_(model, RTNConfig(QuantScheme(bits=8, granularity="channel")))
    assert out is model
    assert quantized_names(model) == sorted(LAYER_LINEARS)
    assert linear_names(model) == ["embed_proj", "lm_head"]
    assert isinstance(model.embed_tokens, nn.Embedding)
    ql = model.layers[0].up_proj
    assert torch.equal(ql.dequantize(), fake_quantize(up.weight.detach(), ql.scheme))
    assert torch.equal(ql.bias, up.bias)
    with torch.no_grad():
        y = model(ids)
    assert float((y - ref).norm() / ref.norm()) < 0.02  # int8 per-channel barely moves the output
    assert DEFAULT_IGNORE == ("lm_head", "re:.*embed.*")


def test_ignore_empty_quantizes_everything():
    model = Toy()
    tc.quantize_(model, QuantScheme(bits=4, group_size=16), ignore=())
    assert quantized_names(model) == sorted(LAYER_LINEARS + ["embed_proj", "lm_head"])
    assert linear_names(model) == []


def test_bare_scheme_means_rtn():
    a, b = Toy(), Toy()
    b.load_state_dict(a.state_dict())
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False)
    tc.quantize_(a, scheme)
    tc.quantize_(b, RTNConfig(scheme))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(m.is_packed for m in a.modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize(
    "targets,expected",
    [
        (["layers.0.up_proj"], ["layers.0.up_proj"]),  # exact fqn
        (["down_proj"], ["layers.0.down_proj", "layers.1.down_proj"]),  # suffix
        (["1.up_proj"], ["layers.1.up_proj"]),  # dotted suffix
        ([r"re:layers\.1\..*"], ["layers.1.down_proj", "layers.1.up_proj"]),  # regex
        (["re:.*_proj"], sorted(LAYER_LINEARS)),  # embed_proj still ignored by default
        (["up_proj", "re:layers\\.0\\.down_proj"], ["layers.0.down_proj", "layers.0.up_proj", "layers.1.up_proj"]),
        ([nn.Linear], sorted(LAYER_LINEARS)),
    ],
)
def test_targets(targets, expected):
    model = Toy()
    tc.quantize_(model, QuantScheme(bits=4, group_size=16), targets=targets)
    assert quantized_names(model) == expected


@pytest.mark.parametrize(
    "ignore,expected",
    [
        (["layers.0.up_proj"], ["embed_proj", "layers.0.down_proj", "layers.1.down_proj", "layers.1.up_proj", "lm_head"]),
        (["up_proj"], ["embed_proj", "layers.0.down_proj", "layers.1.down_proj", "lm_head"]),
        ([r"re:layers\.\d\.down_proj", "lm_head"], ["embed_proj", "layers.0.up_proj", "layers.1.up_proj"]),
    ],
)
def test_explicit_ignore_replaces_default(ignore, expected):
    model = Toy()
    tc.quantize_(model, QuantScheme(bits=4, group_size=16), ignore=ignore)
    assert quantized_names(model) == expected


def test_single_string_targets_and_ignore():
    # a bare string is one pattern, not an iterable of one-character patterns
    model = Toy()
    tc.quantize_(model, QuantScheme(bits=4, group_size=16), targets="up_proj")
    assert quantized_names(model) == ["layers.0.up_proj", "layers.1.up_proj"]
    model = Toy()
    tc.quantize_(model, QuantScheme(bits=4, group_size=16), ignore="lm_head")
    assert type(model.lm_head) is nn.Linear  # must not quantize the head the caller asked to skip
    assert "embed_proj" in quantized_names(model)
    model = Toy()
    tc.quantize_(model, QuantScheme(bits=4, group_size=16), targets=nn.Linear, ignore=())
    assert len(quantized_names(model)) == 6


def test_name_target_of_non_linear_is_not_replaced():
    model = Toy()
    tc.quantize_(model, QuantScheme(bits=4, group_size=16), targets=["layers.0", "embed_tokens"], ignore=())
    assert quantized_names(model) == []
    assert isinstance(model.embed_tokens, nn.Embedding)


def test_linear_subclasses_are_left_alone():
    # e.g. nn.MultiheadAttention.out_proj (NonDynamicallyQuantizableLinear) is read as .weight directly
    mha = nn.Sequential(nn.MultiheadAttention(16, 2), )
    tc.quantize_(mha, QuantScheme(bits=4, group_size=8))
    assert quantized_names(mha) == []


def test_on_module_callback_and_idempotence(caplog):
    model = Toy()
    seen = []
    tc.quantize_(model, QuantScheme(bits=4, group_size=16), on_module=lambda n, old, new: seen.append((n, type(old), type(new))))
    assert sorted(seen) == sorted((n, nn.Linear, QuantLinear) for n in LAYER_LINEARS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="torchcompress.api"):
        tc.quantize_(model, QuantScheme(bits=4, group_size=16))  # nothing left to quantize
    assert "no nn.Linear matched" in caplog.text
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_shared_linear_stays_shared():
    # one Linear registered under two names (weight tying between modules): both names must see
    # the same QuantLinear, not one quantized and one float copy
    shared = nn.Linear(16, 16)
    model = nn.Module()
    model.enc = nn.Sequential(shared)
    model.dec = nn.Sequential(shared)
    tc.quantize_(model, QuantScheme(bits=4, group_size=8))
    assert isinstance(model.enc[0], QuantLinear)
    assert model.dec[0] is model.enc[0]


@pytest.mark.parametrize("bad", [None, {"bits": 4}, "rtn", 4, tc.Granularity.GROUP])
def test_unknown_config_type(bad):
    with pytest.raises(ConfigError) as ei:
        tc.quantize_(Toy(), bad)
    assert ei.value.field == "config"


@pytest.mark.parametrize("bad_scheme", [None, {"bits": 4}, 4])
def test_configs_require_a_scheme(bad_scheme):
    for cls in (RTNConfig, QATConfig):
        with pytest.raises(ConfigError):
            cls(bad_scheme)


def test_configs_are_frozen():
    cfg = RTNConfig(QuantScheme(bits=4))
    with pytest.raises(Exception):
        cfg.scheme = QuantScheme(bits=8)
    with pytest.raises(Exception):
        cfg.scheme.bits = 8


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("config", [RTNConfig(QuantScheme(bits=4, group_size=16)), QATConfig(QuantScheme(bits=4, group_size=16))], ids=["rtn", "qat"])
def test_nan_weight_error_names_module(bad, config):
    model = Toy()
    with torch.no_grad():
        model.layers[1].down_proj.weight[3, 5] = bad
    with pytest.raises(NumericError) as ei:
        tc.quantize_(model, config)
    assert "layers.1.down_proj.weight" in str(ei.value)
    assert ei.value.tensor == "layers.1.down_proj.weight"


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_linear_rejected():
    model = nn.Sequential(nn.Linear(8, 0))
    with pytest.raises(NumericError) as ei:
        tc.quantize_(model, QuantScheme(bits=4, group_size=4))
    assert "0.weight" in str(ei.value)


def test_qat_config_then_freeze():
    torch.manual_seed(0)
    model = Toy()
    ids = torch.randint(0, 50, (4, 9))
    target = torch.randint(0, 50, (4, 9))
    tc.quantize_(model, QATConfig(QuantScheme(bits=4, group_size=16)))
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 4 and not any(m.is_packed for m in qls)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    master0 = model.layers[0].up_proj.weight.detach().clone()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(ids).flatten(0, 1), target.flatten())
        loss.backward()
        assert model.layers[0].up_proj.weight.grad is not None
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert not torch.equal(model.layers[0].up_proj.weight, master0)  # master weights trained
    with torch.no_grad():
        y_fake = model(ids)
    assert tc.freeze_(model) is model
    assert all(m.is_packed for m in qls)
    assert not any(n.endswith("proj.weight") and "embed" not in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), y_fake, rtol=1e-5, atol=1e-5)


def test_freeze_nan_master_weight_error_names_module():
    # a QAT run that diverged: freeze_ must say which layer holds the NaN, not just "weight"
    model = Toy()
    tc.quantize_(model, QATConfig(QuantScheme(bits=4, group_size=16)))
    with torch.no_grad():
        model.layers[1].up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericError) as ei:
        tc.freeze_(model)
    assert "layers.1.up_proj" in str(ei.value)


def test_freeze_on_packed_and_plain_models_is_a_no_op():
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tc.freeze_(model)  # no QuantLinear at all
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    tc.quantize_(model, QuantScheme(bits=4, group_size=16))
    packed = {k: v.clone() for k, v in model.state_dict().items()}
    tc.freeze_(model)
    assert all(torch.equal(packed[k], v) for k, v in model.state_dict().items())


@pytest.mark.hf
def test_quantize_tiny_llama(tiny_llama, token_ids):
    model = tiny_llama(tied=False)
    with torch.no_grad():
        ref = model(token_ids).logits
    tc.quantize_(model, QuantScheme(bits=8, granularity="channel"))
    names = quantized_names(model)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert "lm_head" not in names and type(model.lm_head) is nn.Linear
    assert all(n.startswith("model.layers.") for n in names)
    with torch.no_grad():
        y = model(token_ids).logits
    assert float((y - ref).norm() / ref.norm()) < 0.05
