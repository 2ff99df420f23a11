import pytest
import torch
from torch import nn

from torchcompress.api import prune_
from torchcompress.errors import ConfigError, NumericError
from torchcompress.formats.checkpoint import load_compressed, save_compressed
from torchcompress.nn.pruned_linear import PrunedLinear
from torchcompress.primitives.sparsity import magnitude_mask
from torchcompress.prune import (
    MagnitudePruneConfig,
    SparseGPTConfig,
    WandaConfig,
    make_permanent_,
    sparsity_report,
)


def _fresh(tiny):
    import copy

    model, tok, calib = tiny
    return copy.deepcopy(model), tok, calib


def test_pruned_linear_forward_grad_permanent():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    keep = magnitude_mask(lin.weight.detach(), 0.5)
    p = PrunedLinear.from_linear(lin, keep)
    x = torch.randn(3, 8, requires_grad=True)
    torch.testing.assert_close(p(x), nn.functional.linear(x, lin.weight * keep, lin.bias))
    p(x).sum().backward()
    assert (p.weight.grad[~keep] == 0).all() and (p.weight.grad[keep] != 0).any()
    assert p.sparsity() == 0.5 and p.pruned_count() == 24
    plain = p.make_permanent()
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain(x), p(x))
    with pytest.raises(NumericError):
        PrunedLinear.from_linear(lin, keep[:, :4])


@pytest.mark.parametrize("cfg", [MagnitudePruneConfig(0.5), MagnitudePruneConfig(0.3, scope="global"),
                                 MagnitudePruneConfig(n=2, m=4)])
def test_magnitude_prune_model(tiny, cfg):
    model, _, _ = _fresh(tiny)
    n_lin = sum(1 for _, m in model.named_modules() if type(m) is nn.Linear and m.out_features != model.config.vocab_size)
    prune_(model, cfg, ignore=["lm_head", "re:.*o_proj"])
    rep = sparsity_report(model, linears_only_pruned=True)
    assert len(rep.layers) == n_lin - 2  # two o_proj ignored
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)
    assert not isinstance(model.model.layers[0].self_attn.o_proj, PrunedLinear)
    if cfg.n:
        for _, m in model.named_modules():
            if isinstance(m, PrunedLinear):
                assert (m.mask.reshape(m.out_features, -1, 4).sum(-1) == 2).all()
                assert m.nm == (2, 4)
    elif cfg.scope == "global":
        assert rep.linear_zeros == round(0.3 * rep.linear_params)
    else:
        assert all(r.zeros == round(0.5 * r.params) for r in rep.layers)


@pytest.mark.parametrize("cfg", [WandaConfig(0.5), WandaConfig(n=2, m=4), SparseGPTConfig(0.5, block_size=32),
                                 SparseGPTConfig(n=4, m=8, block_size=32)])
def test_calibrated_prune_counts_and_patterns(tiny, cfg):
    model, tok, calib = _fresh(tiny)
    ids = calib.input_ids[:2]
    seen = []
    prune_(model, cfg, calib_data=calib, on_module=lambda n, old, new: seen.append(n))
    assert len(seen) == 14  # 7 linears x 2 blocks, lm_head ignored by default
    for name, m in model.named_modules():
        if isinstance(m, PrunedLinear):
            w_eff = m.weight * m.mask
            if cfg.n:
                g = m.mask.reshape(m.out_features, -1, cfg.m)
                assert (g.sum(-1) == cfg.n).all(), name
            elif isinstance(cfg, WandaConfig):
                assert ((~m.mask).sum(1) == round(0.5 * m.in_features)).all(), name
            else:
                assert m.pruned_count() == round(0.5 * m.mask.numel()), name
            assert int((w_eff == 0).sum()) >= m.pruned_count()
    out = model(ids).logits
    assert torch.isfinite(out).all()


def test_sparsegpt_updates_weights_wanda_does_not(tiny):
    model, _, calib = _fresh(tiny)
    ref = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    w = _fresh(tiny)[0]
    prune_(model, SparseGPTConfig(0.5), calib_data=calib)
    prune_(w, WandaConfig(0.5), calib_data=calib)
    sg, wa = model.model.layers[1].mlp.down_proj, w.model.layers[1].mlp.down_proj
    torch.testing.assert_close(wa.weight[wa.mask], ref[wa.mask])  # Wanda only masks
    assert not torch.allclose(sg.weight[sg.mask], ref[sg.mask])  # SparseGPT reconstructs


def test_needs_calibration_and_bad_config(tiny):
    model, _, _ = _fresh(tiny)
    with pytest.raises(ConfigError, match="calib_data"):
        prune_(model, WandaConfig(0.5))
    with pytest.raises(ConfigError, match="sparsity"):
        MagnitudePruneConfig(1.5)
    with pytest.raises(ConfigError, match="n"):
        WandaConfig(n=4, m=4)
    with pytest.raises(ConfigError, match="scope"):
        MagnitudePruneConfig(n=2, m=4, scope="global")
    with pytest.raises(ConfigError, match="block_size"):
        SparseGPTConfig(n=2, m=4, block_size=6)
    with pytest.raises(ConfigError, match="prune_ does not handle"):
        prune_(model, object())


def test_save_load_pruned(tiny, tmp_path):
    model, tok, calib = _fresh(tiny)
    prune_(model, WandaConfig(n=2, m=4), calib_data=calib)
    ids = calib.input_ids[:2]
    want = model(ids).logits
    save_compressed(model, tmp_path / "m", tok)
    back = load_compressed(tmp_path / "m")
    got = back(ids).logits
    assert torch.equal(got, want)
    a, b = model.model.layers[0].mlp.up_proj, back.model.layers[0].mlp.up_proj
    assert isinstance(b, PrunedLinear) and torch.equal(a.mask, b.mask) and b.nm == (2, 4)
    # second pruning never revives weights; permanent folding keeps the outputs
    prune_(back, MagnitudePruneConfig(0.75))
    assert back.model.layers[0].mlp.up_proj.sparsity() == pytest.approx(0.75, abs=0.01)
    out = back(ids).logits
    make_permanent_(back)
    assert not any(isinstance(m, PrunedLinear) for m in back.modules())
    torch.testing.assert_close(back(ids).logits, out)


def test_report_table(tiny):
    model, _, _ = _fresh(tiny)
    prune_(model, MagnitudePruneConfig(n=2, m=4))
    rep = sparsity_report(model)
    assert "2:4" in rep.table()
    d = rep.to_dict()
    assert d["model_params"] == sum(p.numel() for p in model.parameters())
    assert any(r["pattern"] == "dense" for r in d["layers"])  # lm_head


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype)
    prune_(model, MagnitudePruneConfig(n=2, m=4), ignore=())
    assert model[0].weight.dtype == dtype and model[0].mask.dtype == torch.bool
    x = torch.randn(2, 16, dtype=dtype)
    torch.testing.assert_close(model[0](x), nn.functional.linear(x, model[0].weight * model[0].mask, model[0].bias))
    assert (model[0].mask.reshape(8, -1, 4).sum(-1) == 2).all()


def test_nan_calibration_is_named(tiny):
    model, _, calib = _fresh(tiny)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(NumericError, match="layers.0.mlp"):
        prune_(model, SparseGPTConfig(0.5), calib_data=calib)


def test_resume_after_kill_is_identical(tiny, tmp_path):
    from torchcompress.errors import InputError
    from torchcompress.prune.apply import prunable
    from torchcompress.prune.apply import prune_ as prune_resumable
    from torchcompress.prune.sequential import prune_sequential

    cfg = SparseGPTConfig(0.5, block_size=32)
    full, _, calib = _fresh(tiny)
    prune_(full, cfg, calib_data=calib)

    class Killed(Exception):
        pass

    def kill(b, n):
        if b == 0:
            raise Killed

    part = _fresh(tiny)[0]
    with pytest.raises(Killed):
        prune_sequential(part, cfg, calib, prunable(part, (nn.Linear,), ("lm_head",)), on_block=kill, state_dir=tmp_path / "s")
    again = _fresh(tiny)[0]
    with pytest.raises(InputError, match="different model"):
        prune_resumable(again, SparseGPTConfig(0.6), calib_data=calib, state_dir=tmp_path / "s", ignore=["lm_head"])
    again = _fresh(tiny)[0]
    prune_resumable(again, cfg, calib_data=calib, state_dir=tmp_path / "s", ignore=["lm_head"])
    for (n, a), (_, b) in zip(full.named_modules(), again.named_modules()):
        if isinstance(a, PrunedLinear):
            assert isinstance(b, PrunedLinear) and torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask), n
