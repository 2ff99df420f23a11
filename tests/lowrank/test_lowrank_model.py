"""lowrank_ on a tiny Llama: shapes, parameter counts, activation-aware beats plain, save/load."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny import calibrated_tiny_llama
from torchcompress import ConfigError, InputError, load_compressed, save_compressed
from torchcompress.api import lowrank_
from torchcompress.lowrank import SVDConfig
from torchcompress.nn.lowrank_linear import LowRankLinear
from torchcompress.primitives.svd import rank_for_ratio

pytestmark = pytest.mark.hf
MLP = ["re:.*mlp\\..*"]


@pytest.fixture(scope="module")
def tiny():
    return calibrated_tiny_llama(hidden_size=128, intermediate_size=192, samples=8, seq_len=32)


def _lowrank(model, **kw):
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _logit_mse(a, b, calib):
    with torch.no_grad():
        ids, mask = calib.input_ids, calib.attention_mask
        la, lb = a(input_ids=ids, attention_mask=mask).logits, b(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    return float((la[keep] - lb[keep]).double().square().mean())


def test_param_ratio_uniform(tiny):
    model, _, calib = tiny
    m = lowrank_(copy.deepcopy(model), SVDConfig(param_ratio=0.5), targets=MLP)
    lr = _lowrank(m)
    assert len(lr) == 6  # 2 blocks x gate/up/down
    for n, mod in lr.items():
        assert mod.rank == rank_for_ratio(mod.out_features, mod.in_features, 0.5)
        assert mod.num_params() <= 0.5 * mod.in_features * mod.out_features
        # the factors reproduce the float64 truncation: weight error = Eckart-Young bound
        w = model.get_submodule(n).weight.detach().double()
        err = float((w - mod.weight.detach().double()).square().sum())
        assert err == pytest.approx(mod.svd_info["discarded_energy"], rel=1e-4)  # float32 factors
    assert not any("self_attn" in n for n in lr)


def test_rank_and_energy(tiny):
    model, _, _ = tiny
    m = lowrank_(copy.deepcopy(model), SVDConfig(rank=16), targets=MLP)
    assert {mod.rank for mod in _lowrank(m).values()} == {16}
    m = lowrank_(copy.deepcopy(model), SVDConfig(energy=0.6), targets=MLP)
    for mod in _lowrank(m).values():
        info = mod.svd_info
        assert 1 - info["discarded_energy"] / info["total_energy"] >= 0.6 - 1e-9
    # energy 1.0 needs full rank: factorizing would not save anything, every layer stays dense
    m = lowrank_(copy.deepcopy(model), SVDConfig(energy=1.0), targets=MLP)
    assert not _lowrank(m)


def test_activation_aware_beats_plain_at_same_ranks(tiny):
    model, _, calib = tiny
    plain = lowrank_(copy.deepcopy(model), SVDConfig(param_ratio=0.3), targets=MLP)
    aware = lowrank_(copy.deepcopy(model), SVDConfig(param_ratio=0.3, activation_aware=True), targets=MLP, calib_data=calib)
    assert {n: m.rank for n, m in _lowrank(plain).items()} == {n: m.rank for n, m in _lowrank(aware).items()}
    e_plain, e_aware = _logit_mse(model, plain, calib), _logit_mse(model, aware, calib)
    assert e_aware < e_plain


def test_global_budget(tiny):
    model, _, calib = tiny
    m = lowrank_(copy.deepcopy(model), SVDConfig(param_ratio=0.4, allocation="global", activation_aware=True),
                 targets=MLP, calib_data=calib)
    lr = _lowrank(m)
    dense = sum(mod.in_features * mod.out_features for mod in lr.values())
    assert sum(mod.rank * (mod.in_features + mod.out_features) for mod in lr.values()) <= 0.4 * dense
    assert len({mod.rank for mod in lr.values()}) > 1  # ranks differ per layer


def test_save_load_roundtrip(tiny, tmp_path):
    model, tok, calib = tiny
    m = lowrank_(copy.deepcopy(model), SVDConfig(rank=8), targets=MLP)
    save_compressed(m, tmp_path / "out", tokenizer=tok)
    back = load_compressed(tmp_path / "out")
    assert isinstance(back.model.layers[1].mlp.down_proj, LowRankLinear)
    assert _logit_mse(m, back, calib) == 0.0


def test_bad_input(tiny):
    model, _, _ = tiny
    with pytest.raises(ConfigError, match="exactly one"):
        SVDConfig(rank=4, energy=0.5)
    with pytest.raises(ConfigError, match="param_ratio"):
        SVDConfig(param_ratio=1.5)
    with pytest.raises(ConfigError, match="allocation"):
        SVDConfig(rank=4, allocation="global")
    with pytest.raises(ConfigError, match="calib_data"):
        lowrank_(copy.deepcopy(model), SVDConfig(rank=4, activation_aware=True), targets=MLP)
    with pytest.raises(ConfigError, match="no nn.Linear"):
        lowrank_(copy.deepcopy(model), SVDConfig(rank=4), targets=["nothing_here"])
    with pytest.raises(InputError, match="outside the decoder"):
        lowrank_(copy.deepcopy(model), SVDConfig(rank=4, activation_aware=True), targets=["lm_head"], ignore=(),
                 calib_data=tiny[2])


def test_nan_weight_is_named(tiny):
    from torchcompress import NumericError

    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(NumericError, match="layers.0.mlp.up_proj.weight"):
        lowrank_(model, SVDConfig(rank=4), targets=MLP)
