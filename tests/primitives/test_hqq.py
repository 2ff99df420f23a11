"""HQQ (primitives/hqq.py) against the paper's update written naively here, group by group in Python
loops, and against round-to-nearest on the same weights; edge cases of QUALITY.md."""

from __future__ import annotations

import pytest
import torch

from torchcompress.config import QuantScheme
from torchcompress.errors import NumericError
from torchcompress.primitives.affine import dequantize_affine, quantize_affine
from torchcompress.primitives.hqq import hqq_qparams, quantize_hqq


def heavy_tailed(n, k, seed=0):
    # weights of trained layers: a Student-t body with a few large outliers
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((n, k)) * 0.02
    idx = torch.randint(0, n * k, (max(1, n * k // 200),), generator=g)
    w.view(-1)[idx] *= 8
    return w


def naive_hqq_float_zero(w, bits, gs, lp=0.7, beta0=10.0, kappa=1.01, iters=20, dt=torch.float16, round_zero=True):
    """The paper's solver (zero-point update, scale fixed) for one group at a time, written from the
    formulas: W_e = shrink_p(W - W_r), z = mean(W_q - (W - W_e) / s); keeps the iterate (stored in
    ``dt``) with the smallest squared error, the start and RTN's (integer-zero) parameters included."""
    n, k = w.shape
    qmax = 2 ** bits - 1
    scales, zeros = [], []
    for r in range(n):
        srow, zrow = [], []
        for g0 in range(0, k, gs):
            x = w[r, g0:g0 + gs].double()
            s = float(torch.tensor(float((x.max() - x.min()) / qmax) or 1.0).to(dt))
            z = float(-x.min() / s)
            z = float(torch.tensor(float(round(z)) if round_zero else z).to(dt))

            def err(s, z):
                q = torch.clamp(torch.round(x / s + z), 0, qmax)
                return float(((q - z) * s - x).pow(2).sum())

            # RTN: range holding 0, integer zero
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            s_r = float(torch.tensor((hi - lo) / qmax or 1.0).to(dt))
            z_r = float(min(max(round(-lo / s_r), 0), qmax))
            best = (err(s_r, z_r), s_r, z_r)
            if err(s, z) < best[0]:
                best = (err(s, z), s, z)
            beta = beta0
            for _ in range(iters):
                q = torch.clamp(torch.round(x / s + z), 0, qmax)
                d = x - (q - z) * s
                w_e = torch.sign(d) * torch.clamp(d.abs() - d.abs() ** (lp - 1) / beta, min=0)
                z = float(torch.tensor(float((q - (x - w_e) / s).mean())).to(dt))
                beta *= kappa
                e = err(s, z)
                if e < best[0]:
                    best = (e, s, z)
            srow.append(best[1])
            zrow.append(best[2])
        scales.append(srow)
        zeros.append(zrow)
    return torch.tensor(scales), torch.tensor(zeros)


@pytest.mark.parametrize("bits,gs,round_zero", [(4, 32, True), (3, 16, False), (2, 24, True), (4, 32, False)])
def test_float_zero_matches_naive_paper_update(bits, gs, round_zero):
    w = heavy_tailed(6, 96, seed=bits)
    sch = QuantScheme(bits=bits, group_size=gs, symmetric=False, float_zero=True)
    s, z, g = hqq_qparams(w, sch, optimize_scale=False, round_zero=round_zero, early_stop=False)
    s_ref, z_ref = naive_hqq_float_zero(w, bits, gs, round_zero=round_zero)
    assert g == gs and s.dtype == z.dtype == torch.float16
    torch.testing.assert_close(s.float(), s_ref.float(), rtol=0, atol=0)
    # float32 vs float64 sums can land one fp16 ulp apart on a zero point; nothing more
    dz = (z.float() - z_ref.float()).abs()
    ulp = torch.finfo(torch.float16).eps * z_ref.float().abs().clamp_min(1)
    assert bool((dz <= ulp).all()), f"zero points differ by up to {float(dz.max())}"
    assert float((dz > 0).float().mean()) < 0.05


def _sq_err(w, q, bits):
    return float((dequantize_affine(q.codes, q.scale, q.zero, bits, q.group_size) - w.float()).square().sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("gs", [32, 64, 128, 100])  # 100: a partial last group of 300 inputs
@pytest.mark.parametrize("float_zero", [False, True])
def test_weight_error_at_most_rtn(bits, gs, float_zero):
    w = heavy_tailed(16, 300, seed=bits * gs)
    rtn_scheme = QuantScheme(bits=bits, group_size=gs, symmetric=False)
    sch = QuantScheme(bits=bits, group_size=gs, symmetric=False, float_zero=float_zero)
    e_rtn = _sq_err(w, quantize_affine(w, rtn_scheme), bits)
    q = quantize_hqq(w, sch)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2 ** bits - 1
    assert q.zero.dtype == (torch.float16 if float_zero else torch.uint8)
    e = _sq_err(w, q, bits)
    assert e <= e_rtn  # RTN's parameters are a candidate; the best stored candidate per group is kept
    if not float_zero:
        assert int(q.zero.max()) <= 2 ** bits - 1


def test_gain_and_output_error_on_real_like_weights():
    """On heavy-tailed weights at W4 g64, HQQ's weight and output errors are both below RTN's."""
    w = heavy_tailed(64, 512, seed=3)
    x = torch.randn(128, 512, generator=torch.Generator().manual_seed(1))
    rtn = quantize_affine(w, QuantScheme(bits=4, group_size=64, symmetric=False))
    w_rtn = dequantize_affine(rtn.codes, rtn.scale, rtn.zero, 4, 64)
    for fz in (False, True):
        q = quantize_hqq(w, QuantScheme(bits=4, group_size=64, symmetric=False, float_zero=fz))
        w_h = dequantize_affine(q.codes, q.scale, q.zero, 4, 64)
        out_h, out_r = float(((w_h - w) @ x.T).norm()), float(((w_rtn - w) @ x.T).norm())
        assert out_h < out_r, (fz, out_h, out_r)
    # measured: float-zero HQQ cuts the squared weight error by ~25% here; require 10%
    assert _sq_err(w, q, 4) < 0.9 * _sq_err(w, rtn, 4)


def test_symmetric_optimises_the_scale():
    w = heavy_tailed(8, 256, seed=5)
    sch = QuantScheme(bits=4, group_size=64, symmetric=True)
    q = quantize_hqq(w, sch, optimize_scale=True)
    assert q.zero is None
    e_rtn = _sq_err(w, quantize_affine(w, sch), 4)
    assert _sq_err(w, q, 4) < e_rtn
    with pytest.raises(ValueError, match="symmetric"):
        hqq_qparams(w, sch, optimize_scale=False)


@pytest.mark.parametrize("float_zero", [False, True])
def test_edge_cases(float_zero):
    sch = QuantScheme(bits=4, group_size=16, symmetric=False, float_zero=float_zero)
    w = torch.randn(4, 64)
    w[0, :16] = 0  # an all-zero group
    w[1] = 0  # an all-zero row
    w[2, :16] = 1e-6 * torch.randn(16)  # tiny
    w[2, 16:32] = 1e-30  # denormal-ish constant (below fp16's range)
    w[3, 48:] = torch.tensor([5e-39] * 16)  # float32 denormals
    q = quantize_hqq(w, sch)
    assert bool(torch.isfinite(q.scale.float()).all()) and bool((q.scale.float() > 0).all())
    assert bool(torch.isfinite(q.zero.float()).all())
    w_hat = dequantize_affine(q.codes, q.scale, q.zero, 4, 16)
    assert bool(torch.isfinite(w_hat).all())
    assert bool((w_hat[0, :16] == 0).all()) and bool((w_hat[1] == 0).all())
    # tiny values stay tiny: fp16 scales floor at 6.1e-5, so 1e-6 weights land on 0 (as RTN puts them)
    assert float((w_hat[2, :32] - w[2, :32]).abs().max()) <= float(w[2, :16].abs().max())
    rtn = quantize_affine(w, QuantScheme(bits=4, group_size=16, symmetric=False))
    assert _sq_err(w, q, 4) <= _sq_err(w, rtn, 4) * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(dtype):
    w32 = heavy_tailed(8, 128, seed=7)
    w = w32.to(dtype)
    sch = QuantScheme(bits=4, group_size=64, symmetric=False, float_zero=True)
    q, q32 = quantize_hqq(w, sch), quantize_hqq(w.float(), sch)
    assert torch.equal(q.codes, q32.codes) and torch.equal(q.scale, q32.scale) and torch.equal(q.zero, q32.zero)


def test_shapes_and_bad_input():
    sch = QuantScheme(bits=3, group_size=8, symmetric=False, float_zero=True)
    for shape in [(1, 1), (1, 13), (5, 7)]:
        q = quantize_hqq(torch.randn(*shape), sch)
        assert q.codes.shape == shape
    q = quantize_hqq(torch.randn(5, 40), QuantScheme(bits=4, granularity="tensor", symmetric=False))
    assert q.scale.shape == (1, 1)
    q = quantize_hqq(torch.randn(5, 40), QuantScheme(bits=4, granularity="channel", symmetric=False))
    assert q.scale.shape == (5, 1)
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(NumericError, match="layer.weight"):
        quantize_hqq(w, sch, name="layer.weight")
    with pytest.raises(NumericError, match="2-D"):
        quantize_hqq(torch.randn(8), sch)
