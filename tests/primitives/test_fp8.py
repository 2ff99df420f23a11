"""FP8 e4m3 quantizers against formulas written here: the e4m3 value set built from its bit layout,
nearest-with-ties-to-even rounding, per-channel / per-block / per-token scales."""

import math

import pytest
import torch

from torchcompress.errors import NumericError
from torchcompress.primitives.fp8 import (E4M3_MAX, dequantize_fp8, fp8_qdq_per_token, quantize_fp8_block,
                                          quantize_fp8_channel, to_e4m3)


def _e4m3_grid() -> list[tuple[float, int]]:
    """(value, mantissa bits) of every finite non-negative e4m3fn code: 4 exponent bits (bias 7),
    3 mantissa bits, subnormals at exponent 0, exponent 15 mantissa 7 is NaN (no infinities)."""
    out = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue
            v = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            out.append((v, m))
    return out


def _round_formula(x: float) -> float:
    grid = _e4m3_grid()
    a = min(abs(x), E4M3_MAX)
    best = min(grid, key=lambda vm: (abs(vm[0] - a), vm[1] % 2))  # nearest; a tie goes to the even mantissa
    return math.copysign(best[0], x) if best[0] else 0.0


def test_grid_max_is_448_and_has_253_finite_non_negative_values():
    g = _e4m3_grid()
    assert max(v for v, _ in g) == E4M3_MAX and len(g) == 127


def test_rounding_matches_the_formula_including_midpoints():
    grid = sorted(v for v, _ in _e4m3_grid())
    mids = [(a + b) / 2 for a, b in zip(grid, grid[1:])]
    gen = torch.Generator().manual_seed(0)
    rand = (torch.randn(2000, generator=gen) * torch.exp2(torch.randint(-10, 9, (2000,), generator=gen).float())).tolist()
    xs = grid + mids + [-m for m in mids] + rand + [500.0, -1e9, 1e-12]
    got = to_e4m3(torch.tensor(xs, dtype=torch.float64)).float().tolist()
    want = [_round_formula(x) for x in xs]
    bad = [(x, g, w) for x, g, w in zip(xs, got, want) if g != w]
    assert not bad, bad[:5]


def test_channel_scale_is_row_absmax_over_448_and_the_row_max_is_exact():
    w = torch.randn(33, 70, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 33)[:, None]
    q, s = quantize_fp8_channel(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (33, 1) and s.dtype == torch.float32
    torch.testing.assert_close(s, w.abs().amax(1, keepdim=True) / 448, rtol=0, atol=0)
    assert torch.equal(q.float().abs().amax(1), torch.full((33,), 448.0))
    want = torch.tensor([[_round_formula(v) for v in row] for row in (w / s).tolist()])
    assert torch.equal(q.float(), want)
    sqnr = 20 * torch.log10(w.norm() / (w - dequantize_fp8(q, s)).norm())
    assert sqnr > 30  # e4m3 keeps 3 mantissa bits: measured 31.4 dB on this weight


def test_block_scales_against_a_naive_loop_with_partial_edge_blocks():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    w[:128, :128] *= 100  # one loud block must not change its neighbours' scales
    q, s = quantize_fp8_block(w, (128, 128))
    assert s.shape == (3, 2) and q.shape == w.shape
    for i in range(3):
        for j in range(2):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert s[i, j] == blk.abs().max() / 448
            qb = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            assert torch.equal(qb, to_e4m3(blk / s[i, j]).float())
    # e4m3 error bound: half a step, 1/16 relative for normals, 2^-10 * scale among the subnormals
    err = (dequantize_fp8(q, s, (128, 128)) - w).abs()
    scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    assert bool((err <= torch.maximum(w.abs() / 16, scale * 2.0 ** -10)).all())


def test_per_token_and_per_group_activation_scales():
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(3))
    q, s, xh = fp8_qdq_per_token(x)
    assert s.shape == (2, 5, 1) and torch.equal(s, x.abs().amax(-1, keepdim=True) / 448)
    assert torch.equal(xh, q.float() * s)
    q, s, xh = fp8_qdq_per_token(x, 128)
    assert s.shape == (2, 5, 2)
    torch.testing.assert_close(s[..., 1], x[..., 128:].abs().amax(-1) / 448, rtol=0, atol=0)


@pytest.mark.parametrize("mag", [0.0, 1e-6, 1e-30, 1e-40, 1e30])
def test_zero_tiny_and_huge_weights_stay_finite(mag):
    w = torch.full((4, 16), mag)
    w[1] *= -1
    q, s = quantize_fp8_channel(w)
    wh = dequantize_fp8(q, s)
    assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(wh).all()
    if mag == 0:
        assert torch.equal(s, torch.ones(4, 1)) and torch.equal(wh, w)
    elif mag >= torch.finfo(torch.float32).tiny:
        torch.testing.assert_close(wh, w, rtol=1e-2, atol=0)
    else:  # a denormal row: the scale stops at the smallest normal fp32, so w / s lands among e4m3's
        # subnormals (step 2^-9): the error is at most half a step, relative to |w| / s
        bound = 2.0 ** -10 / (mag / torch.finfo(torch.float32).tiny)
        assert ((wh - w).abs() / mag).max() <= bound
    _, _, xh = fp8_qdq_per_token(w)
    assert torch.isfinite(xh).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_weights_rejected_by_name(bad):
    w = torch.ones(4, 8)
    w[2, 3] = bad
    with pytest.raises(NumericError, match="layers.0.q_proj.weight"):
        quantize_fp8_channel(w, "layers.0.q_proj.weight")
    with pytest.raises(NumericError, match="blk"):
        quantize_fp8_block(w, (2, 2), "blk")
