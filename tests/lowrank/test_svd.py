"""SVD factorization: Eckart-Young bounds, activation-aware whitening, rank selection, budgets."""

from __future__ import annotations

import pytest
import torch

from torchcompress.primitives import svd as svdm


def _correlated_inputs(t=2048, k=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k)[:, None]  # strongly anisotropic
    return (torch.randn(t, k, generator=g) @ mix + 0.3 * torch.randn(1, k, generator=g)).double()


@pytest.mark.parametrize("shape", [(32, 48), (48, 32), (1, 7), (40, 40)])
@pytest.mark.parametrize("rank", [1, 5, 31])
def test_eckart_young_bound(shape, rank):
    w = torch.randn(shape)
    f = svdm.svd_factors(w, rank)
    s = torch.linalg.svdvals(w.double())
    bound = float(s[min(rank, s.numel()):].square().sum())
    err = float((w.double() - f.up @ f.down).square().sum())
    assert f.discarded_energy == pytest.approx(bound, rel=1e-9, abs=1e-12)
    assert err == pytest.approx(bound, rel=1e-9, abs=1e-10)  # float64 decomposition: ~1e-13 relative measured
    assert f.up.shape == (shape[0], min(rank, min(shape))) and f.down.shape == (min(rank, min(shape)), shape[1])


@pytest.mark.parametrize("rank", [2, 8, 20])
def test_whitened_output_error_is_its_bound_and_beats_plain(rank):
    x = _correlated_inputs()
    w = torch.randn(24, 48, dtype=torch.float64)
    s, d = svdm.cholesky_whitening(x.T @ x, damp=0.0)
    assert d == 0.0
    fa = svdm.whitened_svd_factors(w, s, rank)
    fp = svdm.svd_factors(w, rank)
    out_err = lambda f: float((x @ (w - f.up @ f.down).T).square().sum())  # noqa: E731
    # output error of the whitened truncation = sum of the discarded squared singular values of W S
    assert out_err(fa) == pytest.approx(fa.discarded_energy, rel=1e-6)
    assert out_err(fa) <= out_err(fp)
    assert out_err(fp) > 1.3 * out_err(fa)  # measured ratios 1.58 / 4.1 / 24.6 at ranks 2 / 8 / 20 (seed 0)


def test_whitening_damps_rank_deficient_activations():
    x = torch.randn(10, 32, dtype=torch.float64)  # 10 tokens, 32 features: X^T X has rank 10
    s, d = svdm.cholesky_whitening(x.T @ x, damp=0.0)
    assert d > 0
    torch.testing.assert_close(s @ s.T, x.T @ x + d * torch.eye(32, dtype=torch.float64))
    f = svdm.whitened_svd_factors(torch.randn(8, 32), s, 4)
    assert torch.isfinite(f.up).all() and torch.isfinite(f.down).all()


def test_rank_rules():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1, 0 of 14
    assert svdm.rank_for_energy(s, 9 / 14) == 1
    assert svdm.rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert svdm.rank_for_energy(s, 1.0) == 3
    assert svdm.rank_for_energy(torch.zeros(3), 0.9) == 1
    assert svdm.rank_for_ratio(576, 1536, 0.5) == 209  # 209 * 2112 <= 0.5 * 576 * 1536 < 210 * 2112
    assert svdm.max_useful_rank(576, 1536) == 418 and 419 * 2112 >= 576 * 1536 > 418 * 2112


def test_global_allocation_respects_budget_and_favours_low_rank_layers():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g) + 0.01 * torch.randn(64, 64, generator=g)
    full = torch.randn(64, 64, generator=g)
    spectra = [torch.linalg.svdvals(low.double()), torch.linalg.svdvals(full.double())]
    shapes = [(64, 64), (64, 64)]
    budget = int(0.25 * 2 * 64 * 64)
    ranks = svdm.allocate_ranks(spectra, shapes, budget)
    assert sum(r * 128 for r in ranks) <= budget
    assert 4 <= ranks[0] < ranks[1]  # the near-rank-4 layer needs little; the rest goes to the full one
    assert sum(r * 128 for r in ranks) > budget - 128  # nothing left that would still fit
    # the relative error summed over layers is no worse than the uniform split of the same budget
    rel = lambda s, r: float(s[r:].square().sum() / s.square().sum())  # noqa: E731
    uni = budget // 2 // 128
    assert rel(spectra[0], ranks[0]) + rel(spectra[1], ranks[1]) <= rel(spectra[0], uni) + rel(spectra[1], uni)
