"""GPTQ math: beats RTN on correlated inputs, act-order/g_idx consistency, dead columns, bad Hessians."""


import pytest
import torch

from torchcompress.config import QuantScheme
from torchcompress.errors import NumericError
from torchcompress.primitives.affine import dequantize_affine, fake_quantize, quantize_affine
from torchcompress.primitives.gptq import accumulate_hessian, dequantize_with_g_idx, gptq_quantize, layer_error


def _problem(k=192, n=48, t=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(t, k, generator=g) @ mix + 0.2 * torch.randn(t, k, generator=g)  # correlated inputs
    x[:, :3] *= 10  # a few outlier channels, as real activations have
    w = torch.randn(n, k, generator=g) * 0.05
    h = accumulate_hessian(torch.zeros(k, k, dtype=torch.float64), x) * (2 / t)
    return w, x, h


def _out_err(w_hat, w, x):
    return float(((x @ w.T - x @ w_hat.T) ** 2).sum())


@pytest.mark.parametrize("bits,group,sym,act_order", [
    (4, 64, True, False), (4, 64, True, True), (3, 32, False, True), (2, 64, True, False),
    (8, 64, False, False), (4, 100, True, True),  # 100: partial last group of 192
])
def test_output_error_not_worse_than_rtn(bits, group, sym, act_order):
    w, x, h = _problem()
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym)
    res = gptq_quantize(w, h, scheme, act_order=act_order, block_size=64)
    assert not res.fallback
    gptq_err, rtn_err = _out_err(res.dequantize(), w, x), _out_err(fake_quantize(w, scheme), w, x)
    assert gptq_err <= rtn_err
    # measured ratio 0.3-0.7 on this problem; GPTQ must give a real gain, not a tie
    assert gptq_err < 0.8 * rtn_err
    assert int(res.codes.max()) < 2 ** bits


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_channel_and_tensor_granularity(granularity):
    w, x, h = _problem()
    scheme = QuantScheme(bits=4, granularity=granularity)
    res = gptq_quantize(w, h, scheme)
    assert _out_err(res.dequantize(), w, x) < _out_err(fake_quantize(w, scheme), w, x)


def test_block_size_does_not_change_the_math():
    w, _, h = _problem()
    scheme = QuantScheme(bits=4, group_size=32)
    a = gptq_quantize(w, h, scheme, block_size=16)
    b = gptq_quantize(w, h, scheme, block_size=192)
    # lazy batched updates are the same algebra in a different summation order
    assert (a.codes != b.codes).float().mean() < 0.01
    assert torch.allclose(a.dequantize(), b.dequantize(), atol=float(a.scale.float().max()) + 1e-6)


def test_act_order_groups_match_g_idx():
    w, _, h = _problem()
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    res = gptq_quantize(w, h, scheme, act_order=True)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    # groups are consecutive runs of the act-order permutation
    assert torch.equal(res.g_idx[order].long(), torch.arange(192) // 32)
    assert not res.sequential_groups
    # each group's codes reproduce the weights with that group's scale and zero: dequantize by hand
    manual = (res.codes.float() - res.zero.float()[:, res.g_idx.long()]) * res.scale.float()[:, res.g_idx.long()]
    assert torch.equal(manual, res.dequantize())
    # and every code lies on the grid of its group: requantizing the dequantized weight is exact
    for grp in range(6):
        cols = (res.g_idx == grp).nonzero().flatten()
        sub = res.dequantize()[:, cols]
        s, z = res.scale[:, grp:grp + 1], res.zero[:, grp:grp + 1]
        from torchcompress.primitives.affine import quantize_with_qparams
        assert torch.equal(quantize_with_qparams(sub, s, z, 4, cols.numel()), res.codes[:, cols])


def test_static_groups_keep_sequential_g_idx():
    w, x, h = _problem()
    scheme = QuantScheme(bits=3, group_size=32)
    res = gptq_quantize(w, h, scheme, act_order=True, static_groups=True)
    assert res.sequential_groups
    rtn = quantize_affine(w, scheme)
    assert torch.equal(res.scale, rtn.scale)  # static: scales of the float weight
    assert torch.equal(dequantize_affine(res.codes, res.scale, None, 3, 32), res.dequantize())
    assert _out_err(res.dequantize(), w, x) < _out_err(fake_quantize(w, scheme), w, x)


def test_dead_columns_become_zero():
    w, x, _ = _problem()
    x[:, [5, 17]] = 0
    h = accumulate_hessian(torch.zeros(192, 192, dtype=torch.float64), x) * (2 / x.shape[0])
    res = gptq_quantize(w, h, QuantScheme(bits=4, group_size=64), act_order=True)
    assert res.dead_columns == 2 and not res.fallback
    assert res.dequantize()[:, [5, 17]].abs().max() == 0


def test_rank_deficient_hessian_gets_more_damping():
    w, _, _ = _problem()
    x = torch.randn(8, 192)  # 8 samples: rank 8 of 192
    h = accumulate_hessian(torch.zeros(192, 192, dtype=torch.float64), x) * (2 / 8)
    res = gptq_quantize(w, h, QuantScheme(bits=4, group_size=64), damp=0.0)
    assert not res.fallback and res.damp == pytest.approx(0.1)  # 0 fails; the first retry is 10 x 1%


def test_unfactorable_hessian_falls_back_to_rtn(caplog):
    w, _, _ = _problem()
    h = -torch.eye(192, dtype=torch.float64)  # negative definite: no damping of the mean diagonal helps
    scheme = QuantScheme(bits=4, group_size=64)
    res = gptq_quantize(w, h, scheme)
    assert res.fallback
    assert torch.equal(res.dequantize(), fake_quantize(w, scheme))


def test_nan_rejected_with_name():
    w, _, h = _problem()
    h[3, 3] = float("nan")
    with pytest.raises(NumericError, match="q_proj.weight Hessian"):
        gptq_quantize(w, h, QuantScheme(), name="q_proj.weight")
    with pytest.raises(NumericError, match="shape|needs"):
        gptq_quantize(w, h[:5, :5], QuantScheme())


def test_g_idx_dequant_matches_sequential_affine():
    codes = torch.randint(0, 16, (4, 70), dtype=torch.uint8)
    scale = torch.rand(4, 3).half() + 0.1
    zero = torch.randint(0, 16, (4, 3), dtype=torch.uint8)
    g_idx = torch.arange(70, dtype=torch.int32) // 32
    assert torch.equal(dequantize_with_g_idx(codes, scale, zero, g_idx, 4),
                       dequantize_affine(codes, scale, zero, 4, 32))


@pytest.mark.parametrize("n,k", [(1, 1), (1, 70), (5, 3)])
def test_tiny_shapes(n, k):
    w = torch.randn(n, k)
    x = torch.randn(64, k)
    h = accumulate_hessian(torch.zeros(k, k, dtype=torch.float64), x) * (2 / 64)
    for scheme in (QuantScheme(bits=4, group_size=32), QuantScheme(bits=3, granularity="channel", symmetric=False)):
        res = gptq_quantize(w, h, scheme, act_order=True, block_size=16)
        assert res.codes.shape == (n, k) and torch.isfinite(res.dequantize()).all()
        assert layer_error(res.dequantize(), w, h) <= layer_error(fake_quantize(w, scheme), w, h) * (1 + 1e-6) + 1e-9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    w, x, h = _problem()
    scheme = QuantScheme(bits=4, group_size=64)
    res = gptq_quantize(w.to(dtype), h, scheme)
    assert _out_err(res.dequantize(), w.to(dtype).float(), x) < _out_err(fake_quantize(w.to(dtype).float(), scheme), w.to(dtype).float(), x)


def test_all_zero_rows_and_tiny_weights():
    w, x, h = _problem()
    w[0] = 0
    w[1] = 1e-30
    res = gptq_quantize(w, h, QuantScheme(bits=4, group_size=64, symmetric=False))
    deq = res.dequantize()
    assert torch.isfinite(deq).all() and deq[0].abs().max() == 0
    assert torch.isfinite(res.scale.float()).all() and (res.scale.float() > 0).all()


def _loop_search(w, bits, group, sym, norm=2.4, grid=100, maxshrink=0.8):
    """The clip search written out row by row, group by group, with plain Python scalars."""
    n, k = w.shape
    out = []
    for r in range(n):
        row = []
        for g0 in range(0, k, group):
            x = [float(v) for v in w[r, g0:g0 + group]]
            best = None
            for i in range(int(maxshrink * grid) + 1):
                p = 1 - i / grid
                lo, hi = min(min(x) * p, 0.0), max(max(x) * p, 0.0)
                if sym:
                    s = max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1)
                    s = 1.0 if s == 0 else s
                    qs = [min(max(round(v / s), -2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s for v in x]
                else:
                    s = (hi - lo) / (2 ** bits - 1)
                    s = 1.0 if s == 0 else s
                    z = min(max(round(-lo / s), 0), 2 ** bits - 1)
                    qs = [(min(max(round(v / s) + z, 0), 2 ** bits - 1) - z) * s for v in x]
                e = sum(abs(a - b) ** norm for a, b in zip(qs, x))
                if best is None or e < best[0] - 1e-12 * max(1.0, best[0]):
                    best = (e, p)
            row.append(best[1])
        out.append(row)
    return torch.tensor(out)


@pytest.mark.parametrize("sym", [True, False])
def test_search_qparams_matches_a_scalar_loop(sym):
    from torchcompress.primitives.affine import compute_qparams, search_qparams
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 48, generator=g) ** 3  # heavy tails: clipping pays
    scheme = QuantScheme(bits=3, group_size=16, symmetric=sym, scale_dtype="float32")
    s, z, gs = search_qparams(w, scheme)
    s0, _, _ = compute_qparams(w, scheme)
    shrink = _loop_search(w.double(), 3, 16, sym)
    assert gs == 16
    # the chosen scale is the full-range scale times the loop's best shrink factor
    torch.testing.assert_close(s.float(), (s0.double() * shrink).float(), rtol=1e-5, atol=0)
    assert bool((shrink < 1).any())  # the search moved at least some groups


@pytest.mark.parametrize("sym", [True, False])
def test_search_qparams_never_worse_and_p1_is_plain(sym):
    from torchcompress.primitives.affine import compute_qparams, quantize_with_qparams, search_qparams
    w = torch.randn(32, 200, generator=torch.Generator().manual_seed(1)) ** 3
    scheme = QuantScheme(bits=4, group_size=64, symmetric=sym)

    def err(s, z, gs):
        q = quantize_with_qparams(w, s, z, 4, gs)
        return float((dequantize_affine(q, s, z, 4, gs) - w).abs().pow(2.4).sum())

    plain = compute_qparams(w, scheme)
    searched = search_qparams(w, scheme)
    assert err(*searched) < err(*plain)  # measured 0.78 (symmetric) and 0.96 (asymmetric) of the plain error here
    same = search_qparams(w, scheme, maxshrink=0.0)
    torch.testing.assert_close(same[0], plain[0], rtol=0, atol=0)
    if not sym:
        assert torch.equal(same[1], plain[1])


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_mse_lowers_layer_error_at_3_bits(act_order):
    w, x, h = _problem()
    w = w + 0.4 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) ** 5 * 0.05  # outliers
    scheme = QuantScheme(bits=3, group_size=64, symmetric=False)
    plain = gptq_quantize(w, h, scheme, act_order=act_order, block_size=64)
    mse = gptq_quantize(w, h, scheme, act_order=act_order, block_size=64, mse=True)
    e_plain, e_mse = layer_error(plain.dequantize(), w, h), layer_error(mse.dequantize(), w, h)
    assert e_mse < e_plain
    # g_idx and stored params still describe the codes exactly
    torch.testing.assert_close(mse.dequantize(), dequantize_with_g_idx(mse.codes, mse.scale, mse.zero, mse.g_idx, 3))


@pytest.mark.parametrize("sym,act_order,static", [(True, False, False), (False, True, False), (False, True, True),
                                                  (True, True, False)])
def test_mask_keeps_pruned_weights_exactly_zero(sym, act_order, static):
    from torchcompress.primitives.sparsity import nm_mask
    w, x, h = _problem()
    keep = nm_mask(w.abs(), 2, 4)  # 2:4 along K
    scheme = QuantScheme(bits=4, group_size=64, symmetric=sym)
    res = gptq_quantize(w, h, scheme, act_order=act_order, static_groups=static, block_size=64, mask=keep)
    wq = res.dequantize()
    assert bool((wq[~keep] == 0).all())  # every pruned weight is exactly 0 after quantization
    assert bool((wq.reshape(-1, 4) != 0).sum(1).le(2).all())  # the 2:4 pattern holds in every group
    # GPTQ with the mask beats RTN of the pruned weight (measured 0.68-0.76x here)
    rtn = fake_quantize(w * keep, scheme)
    assert _out_err(wq, w * keep, x) < 0.9 * _out_err(rtn, w * keep, x)


def test_mask_bad_shape_is_named():
    w, _, h = _problem()
    with pytest.raises(NumericError, match="layer.w"):
        gptq_quantize(w, h, QuantScheme(bits=4, group_size=64), mask=torch.ones(3, 3, dtype=torch.bool), name="layer.w")


@pytest.mark.parametrize("sym,act_order", [(True, True), (False, False)])
def test_rtn_fallback_keeps_mask_dead_columns_and_mse(sym, act_order):
    # issue 20 item 6: when no damping factors the Hessian, the fallback used to quantize the raw weight
    from torchcompress.primitives.affine import quantize_with_qparams, search_qparams

    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    keep = torch.rand(16, 64, generator=g) > 0.5
    h = -torch.eye(64, dtype=torch.float64)  # negative definite: every damping level fails
    h[5, 5] = h[9, 9] = 0.0  # dead inputs
    scheme = QuantScheme(bits=3, group_size=16, symmetric=sym)
    res = gptq_quantize(w, h, scheme, act_order=act_order, mse=True, mask=keep)
    assert res.fallback
    wq = res.dequantize()
    assert torch.equal(wq[~keep], torch.zeros_like(wq[~keep]))  # pruned: exactly 0
    assert torch.equal(wq[:, [5, 9]], torch.zeros(16, 2))  # dead columns: exactly 0
    prepared = w * keep
    prepared[:, [5, 9]] = 0
    s, z, gs = search_qparams(prepared, scheme)  # the clip-searched ranges of what GPTQ would have quantized
    assert torch.equal(res.scale, s) and (z is None or torch.equal(res.zero, z))
    assert torch.equal(res.codes, quantize_with_qparams(prepared, s, z, 3, gs))
    assert torch.equal(res.g_idx, torch.arange(64, dtype=torch.int32) // 16)


def _naive_gptq(w, h, bits, group, sym, damp=0.01, act_order=False):
    """GPTQ as the paper states it (Frantar et al. 2022, Algorithm 1 without lazy batches), in float64:
    quantize one column at a time (in order of decreasing Hessian diagonal with act-order), and after
    each column subtract its scaled error from every later column with the row of the upper Cholesky
    factor of H^-1. A group's scale (and zero point) comes from min/max of its columns as updated when
    the group starts. Written from the paper, not from primitives/gptq.py."""
    W, H = w.double().clone(), h.double().clone()
    k = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + damp * torch.diagonal(H).mean() * torch.eye(k, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # H^-1 = U^T U
    codes = torch.zeros(W.shape, dtype=torch.int64)
    scales, zeros = [], []
    for j in range(k):
        if j % group == 0:
            blk = W[:, j:j + group]
            if sym:
                s = (blk.abs().amax(1) / (2 ** (bits - 1) - 1)).float().double()  # the scale as stored (fp32)
                z = torch.full_like(s, 2 ** (bits - 1))
            else:
                lo, hi = blk.amin(1).clamp(max=0), blk.amax(1).clamp(min=0)
                s = ((hi - lo) / (2 ** bits - 1)).float().double()
                z = torch.round(-lo / s).clamp(0, 2 ** bits - 1)
            scales.append(s)
            zeros.append(z)
        q = (torch.round(W[:, j] / s) + z).clamp(0, 2 ** bits - 1)
        codes[:, j] = q.long()
        err = (W[:, j] - (q - z) * s) / U[j, j]
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out, torch.stack(scales, 1), torch.stack(zeros, 1)


@pytest.mark.parametrize("sym,act_order,bits", [(True, False, 4), (True, True, 4), (False, True, 3), (False, False, 2)])
def test_codes_equal_a_naive_column_by_column_gptq(sym, act_order, bits):
    # with the group size equal to the block size every group starts on a block, where the lazy updates
    # of all earlier columns have been applied: the project computes what the paper's loop computes.
    # Deliberate difference, not exercised here: with dynamic groups smaller than the block, a group's
    # parameters come from its columns as updated within the block so far (the reference implementation
    # reads the weight as of the block's start, before the in-block updates).
    w, _, h = _problem(k=64, n=16, t=512, seed=7)
    scheme = QuantScheme(bits=bits, group_size=16, symmetric=sym, scale_dtype="float32")
    res = gptq_quantize(w, h, scheme, block_size=16, act_order=act_order, fused=False)
    ref_codes, ref_s, ref_z = _naive_gptq(w, h, bits, 16, sym, act_order=act_order)
    assert torch.equal(res.codes.long(), ref_codes)  # (RTN differs from it in 44-66% of the codes here)
    g = res.g_idx.long()
    order = torch.argsort(g, stable=True)
    # fp32 (project) vs float64 (reference) updates: measured max relative scale difference 4.2e-7
    torch.testing.assert_close(res.scale.double(), ref_s, rtol=2e-6, atol=0)
    if not sym:
        assert torch.equal(res.zero.long(), ref_z.long())
    assert torch.equal(g[order], torch.arange(64) // 16)
