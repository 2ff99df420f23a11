import pytest
import torch

from torchcompress.errors import ConfigError, NumericError
from torchcompress.primitives.gptq import layer_error
from torchcompress.primitives.sparsity import (
    column_importance, global_magnitude_masks, keep_indices, magnitude_mask, nm_mask, row_importance,
    sparsegpt_prune, wanda_mask,
)


def _correlated(k=64, t=2048, seed=0):
    """Inputs with strongly correlated features of very different scales (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(t, k // 4, generator=g)
    mix = torch.randn(k // 4, k, generator=g)
    x = z @ mix + 0.1 * torch.randn(t, k, generator=g)
    x = x * torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]
    return x


def _nm_ok(keep, n, m):
    g = keep.reshape(keep.shape[0], -1, m)
    return bool((g.sum(-1) == n).all())


@pytest.mark.parametrize("shape,s", [((1, 1), 0.5), ((1, 7), 0.3), ((13, 29), 0.5), ((64, 64), 0.9), ((5, 8), 0.0)])
def test_magnitude_exact_count(shape, s):
    w = torch.randn(shape)
    keep = magnitude_mask(w, s)
    assert int((~keep).sum()) == round(s * w.numel())
    if (~keep).any() and keep.any():
        assert w.abs()[~keep].max() <= w.abs()[keep].min()


def test_magnitude_ties_exact_and_deterministic():
    w = torch.ones(6, 10)
    w[0, 0] = 0.0
    keep = magnitude_mask(w, 0.5)
    assert int((~keep).sum()) == 30
    assert not keep[0, 0]
    assert torch.equal(keep, magnitude_mask(w.clone(), 0.5))
    # earliest position is pruned first among equals
    assert not keep.reshape(-1)[:30].any() and keep.reshape(-1)[30:].all()


def test_global_threshold_across_layers():
    torch.manual_seed(0)
    ws = {"a": torch.randn(8, 16) * 10, "b": torch.randn(4, 32) * 0.1, "c": torch.randn(3, 3)}
    masks = global_magnitude_masks(ws, 0.6)
    total = sum(w.numel() for w in ws.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    kept = torch.cat([ws[k].abs()[masks[k]] for k in ws])
    gone = torch.cat([ws[k].abs()[~masks[k]] for k in ws])
    assert gone.max() <= kept.min()
    # the small-scale layer loses almost everything, the large one little
    assert (~masks["b"]).float().mean() > 0.95 and (~masks["a"]).float().mean() < 0.3


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_every_group(n, m):
    w = torch.randn(12, 48)
    keep = magnitude_mask(w, n=n, m=m)
    assert _nm_ok(keep, n, m)
    g, kg = w.abs().reshape(12, -1, m), keep.reshape(12, -1, m)
    # kept entries are the largest of each group
    assert (torch.where(kg, g, torch.inf).amin(-1) >= torch.where(kg, -torch.inf, g).amax(-1)).all()


def test_nm_ties_and_errors():
    keep = nm_mask(torch.zeros(2, 8), 2, 4)
    assert _nm_ok(keep, 2, 4)
    with pytest.raises(NumericError, match="multiple of M=4"):
        nm_mask(torch.randn(2, 6), 2, 4)
    with pytest.raises(ConfigError):
        nm_mask(torch.randn(2, 8), 4, 4)


def test_wanda_per_row_and_scores():
    torch.manual_seed(1)
    w = torch.randn(10, 40)
    norm = torch.rand(40) * 5
    keep = wanda_mask(w, norm, 0.5)
    assert ((~keep).sum(1) == 20).all()
    s = w.abs() * norm
    for r in range(10):
        assert s[r][~keep[r]].max() <= s[r][keep[r]].min()
    keep24 = wanda_mask(w, norm, n=2, m=4)
    assert _nm_ok(keep24, 2, 4)
    # a huge input norm protects that column in every row
    norm[3] = 1e6
    assert wanda_mask(w, norm, 0.5)[:, 3].all()


def test_bad_inputs_named():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(NumericError, match="layer.q"):
        magnitude_mask(w, 0.5, name="layer.q")
    with pytest.raises(ConfigError, match="sparsity"):
        magnitude_mask(torch.randn(4, 8), 1.0)
    with pytest.raises(NumericError, match="activation norms"):
        wanda_mask(torch.randn(4, 8), torch.ones(7))
    h = torch.eye(8)
    h[0, 0] = float("inf")
    with pytest.raises(NumericError, match="Hessian"):
        sparsegpt_prune(torch.randn(4, 8), h)


def _naive_obs(w, h, keep, damp):
    """Unblocked OBS sweep with an explicit inverse of the remaining sub-Hessian at every column."""
    W, k = w.double().clone(), w.shape[1]
    H = h.double() + damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    for i in range(k):
        hinv = torch.linalg.inv(H[i:, i:])
        err = torch.where(keep[:, i], 0.0, W[:, i]) / hinv[0, 0]
        W[:, i:] -= err[:, None] * hinv[0][None, :]
        W[~keep[:, i], i] = 0.0
    return W.float()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_naive_obs(nm):
    x = _correlated(32, 512)
    h = 2 * x.T.double() @ x.double() / x.shape[0]
    w = torch.randn(6, 32)
    kw = dict(n=nm[0], m=nm[1]) if nm else {}
    res = sparsegpt_prune(w, h, 0.5, block_size=8, damp=0.01, **kw)
    assert not res.fallback
    torch.testing.assert_close(res.weight, _naive_obs(w, h, res.mask, 0.01), rtol=1e-3, atol=1e-3)
    assert torch.equal(res.weight == 0, ~res.mask) or bool((res.weight[~res.mask] == 0).all())


def test_sparsegpt_identity_hessian_is_magnitude():
    w = torch.randn(16, 32)
    res = sparsegpt_prune(w, torch.eye(32), 0.5, block_size=32, damp=0.0)
    assert torch.equal(res.mask, magnitude_mask(w, 0.5))
    torch.testing.assert_close(res.weight, w * res.mask)


@pytest.mark.parametrize("k,bs,s", [(37, 8, 0.5), (64, 128, 0.3), (5, 2, 0.7)])
def test_sparsegpt_exact_count(k, bs, s):
    x = _correlated(k if k % 4 == 0 else 40, 256)[:, :k]
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(9, k)
    res = sparsegpt_prune(w, h, s, block_size=bs)
    assert int((~res.mask).sum()) == round(s * w.numel())
    assert bool((res.weight[~res.mask] == 0).all())


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_error_ordering_sparsegpt_wanda_magnitude(nm):
    """On correlated inputs: SparseGPT <= Wanda <= magnitude in layer output error ||(W - W')X||^2."""
    torch.manual_seed(0)
    x = _correlated(64, 4096)
    h = 2 * x.T.double() @ x.double() / x.shape[0]
    w = torch.randn(32, 64)
    kw = dict(n=nm[0], m=nm[1]) if nm else {}
    mag = w * magnitude_mask(w, 0.5, **kw)
    wan = w * wanda_mask(w, x.norm(dim=0), 0.5, **kw)
    sgpt = sparsegpt_prune(w, h, 0.5, block_size=16, **kw).weight
    e_mag, e_wan, e_sgpt = (layer_error(v, w, h) for v in (mag, wan, sgpt))
    assert e_sgpt <= e_wan <= e_mag
    assert e_sgpt < 0.7 * e_wan and e_wan < 0.7 * e_mag


def test_sparsegpt_dead_inputs_and_singular_hessian():
    x = _correlated(16, 8)  # rank-deficient: 8 tokens, 16 features
    x[:, 3] = 0.0
    h = 2 * x.T @ x / 8
    res = sparsegpt_prune(torch.randn(4, 16), h, 0.5, block_size=4, damp=0.01)
    assert not res.fallback and torch.isfinite(res.weight).all()
    assert int((~res.mask).sum()) == 32


def test_structured_importance():
    w = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, -4.0]])
    torch.testing.assert_close(row_importance(w, 1), torch.tensor([3.0, 7.0]))
    torch.testing.assert_close(row_importance(w, 2), torch.tensor([5 ** 0.5, 5.0]))
    torch.testing.assert_close(column_importance(w, 1), torch.tensor([4.0, 2.0, 4.0]))
    assert keep_indices(torch.tensor([1.0, 5.0, 5.0, 0.0]), 2).tolist() == [1, 2]
    assert keep_indices(torch.tensor([2.0, 2.0, 2.0]), 2).tolist() == [0, 1]
    with pytest.raises(ConfigError):
        row_importance(w, 3)
