"""FP4 (e2m1) NVFP4 / MXFP4 quantizers against formulas written here: the e2m1 grid with ties to the
even code, the NVFP4 two-level scales, the MXFP4 power-of-two exponent rule; pack round trips."""

import math

import pytest
import torch

from torchcompress.errors import ConfigError, NumericError
from torchcompress.primitives.fp4 import (dequantize_mxfp4, dequantize_nvfp4, e2m1_codes, e2m1_values, mx_exponent,
                                          mxfp4_qdq, nvfp4_qdq, pack_fp4, quantize_mxfp4, quantize_nvfp4, unpack_fp4)
from torchcompress.primitives.fp8 import to_e4m3

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _e2m1_formula(x: float) -> float:
    a = min(abs(x), 6.0)
    i = min(range(8), key=lambda j: (abs(GRID[j] - a), j % 2))  # nearest; a tie to the even index
    return math.copysign(GRID[i], x) if GRID[i] else 0.0


def test_e2m1_rounding_matches_the_formula_on_the_grid_midpoints_and_random_values():
    mids = [(a + b) / 2 for a, b in zip(GRID, GRID[1:])]
    rand = (torch.randn(3000, generator=torch.Generator().manual_seed(0)) * 3).tolist()
    xs = GRID + mids + [-v for v in GRID + mids] + rand + [7.0, -100.0, 1e-9]
    got = e2m1_values(e2m1_codes(torch.tensor(xs))).tolist()
    assert got == [_e2m1_formula(x) for x in xs]
    # the ties, spelled out: 0.25->0 0.75->1 1.25->1 1.75->2 2.5->2 3.5->4 5->4
    assert [_e2m1_formula(m) for m in mids] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_codes_are_sign_magnitude_nibbles_and_pack_round_trips():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_fp4(codes)
    assert packed.shape == (7, 32) and torch.equal(unpack_fp4(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)  # element 0 in the low nibble
    assert e2m1_values(torch.tensor([7, 15, 9, 0], dtype=torch.uint8)).tolist() == [6.0, -6.0, -0.5, 0.0]


def test_nvfp4_two_level_scales_against_the_formula():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)) * torch.logspace(-2, 2, 8)[:, None]
    packed, s8, gs = quantize_nvfp4(w)
    assert packed.dtype == torch.uint8 and s8.dtype == torch.float8_e4m3fn and s8.shape == (8, 4)
    assert gs.shape == (1,) and gs.item() == pytest.approx(448 * 6 / w.abs().max().item(), rel=1e-6)
    blocks = w.view(8, 4, 16)
    want_s8 = to_e4m3(blocks.abs().amax(-1) / 6 * gs)
    assert torch.equal(s8.float(), want_s8.float())
    eff = s8.float() / gs
    want = torch.tensor([[_e2m1_formula(v) for v in row] for row in (blocks / eff[..., None]).reshape(8, 64).tolist()])
    want = (want.view(8, 4, 16) * eff[..., None]).view(8, 64)
    assert torch.equal(dequantize_nvfp4(packed, s8, gs), want)
    sqnr = 20 * torch.log10(w.norm() / (w - want).norm())
    assert sqnr > 17  # measured 19.5 dB (e2m1, blocks of 16)


def test_nvfp4_activation_qdq_uses_the_static_global_scale_and_saturates_beyond_it():
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    gs = torch.tensor([448 * 6 / x.abs().max().item()])
    xh = nvfp4_qdq(x, gs)
    packed, s8, _ = quantize_nvfp4(x)  # same global scale (the tensor's own max) -> same values
    assert torch.equal(xh, dequantize_nvfp4(packed, s8, gs))
    small = torch.tensor([448 * 6 / (x.abs().max().item() / 4)])  # calibrated on a quarter of the range
    assert bool(torch.isfinite(nvfp4_qdq(x, small)).all())
    assert nvfp4_qdq(x, small).abs().max() <= x.abs().max() / 4 * 1.0001  # block scales saturate at 448


def _mx_exp_formula(amax: float) -> int:
    e = math.floor(math.log2(amax))
    if amax / 2.0 ** e >= 1.75:  # would land at >= 7 in e2m1 units: the next power of two
        e += 1
    return e - 2


def test_mxfp4_exponents_against_the_formula():
    vals = [1.0, 1.5, 1.74, 1.75, 1.99, 2.0, 6.0, 7.0, 0.3, 1e-6, 3e5]
    assert mx_exponent(torch.tensor(vals)).tolist() == [_mx_exp_formula(v) for v in vals]
    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(4)) * 10
    packed, e8 = quantize_mxfp4(w)
    assert e8.dtype == torch.uint8 and e8.shape == (6, 3)
    want_e = torch.tensor([[_mx_exp_formula(a) for a in row] for row in w.view(6, 3, 32).abs().amax(-1).tolist()])
    assert torch.equal(e8.long() - 127, want_e)
    scale = torch.exp2(want_e.float())[..., None]
    want = torch.tensor([[_e2m1_formula(v) for v in row] for row in (w.view(6, 3, 32) / scale).reshape(6, 96).tolist()])
    assert torch.equal(dequantize_mxfp4(packed, e8), (want.view(6, 3, 32) * scale).view(6, 96))
    peak = (w.view(6, 3, 32).abs().amax(-1) / scale[..., 0])
    assert bool(((peak >= 3.5) & (peak < 7)).all())  # the block maximum lands in [3.5, 7) e2m1 units
    assert torch.equal(mxfp4_qdq(w), dequantize_mxfp4(packed, e8))


@pytest.mark.parametrize("mag", [0.0, 1e-6, 1e-30, 1e-40, 1e30])
def test_zero_tiny_and_huge_stay_finite(mag):
    w = torch.full((2, 32), mag)
    w[0] *= -1
    packed, s8, gs = quantize_nvfp4(w)
    wn = dequantize_nvfp4(packed, s8, gs)
    packed, e8 = quantize_mxfp4(w)
    wm = dequantize_mxfp4(packed, e8)
    for wh in (wn, wm):
        assert torch.isfinite(wh).all()
    if mag == 0:
        assert torch.equal(wn, w) and torch.equal(wm, w)
    if 1e-30 <= mag <= 1e30:  # NVFP4: the block max maps onto 6 up to the e4m3 rounding of its scale
        torch.testing.assert_close(wn, w, rtol=0.07, atol=0)  # e4m3 block scale: 1/16 relative
        # MX: the block max lands in [3.5, 7) e2m1 units where the grid step is 1 or 2 -> <= 1/4 relative
        torch.testing.assert_close(wm, w, rtol=0.25, atol=0)


def test_bad_input_is_rejected_by_name():
    w = torch.ones(4, 40)
    with pytest.raises(ConfigError, match="mlp.down_proj.weight.*multiple of the FP4 block size 16"):
        quantize_nvfp4(w, "mlp.down_proj.weight")
    with pytest.raises(ConfigError, match="multiple of the FP4 block size 32"):
        quantize_mxfp4(torch.ones(4, 48), "x")
    w = torch.ones(4, 32)
    w[0, 0] = float("nan")
    with pytest.raises(NumericError, match="q.weight"):
        quantize_nvfp4(w, "q.weight")
    with pytest.raises(NumericError, match="q.weight"):
        quantize_mxfp4(w, "q.weight")


def test_their_fp4_packer_gives_our_bytes():
    ct = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(5)) * 4
    x[0, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0])
    vals = e2m1_values(e2m1_codes(x))
    theirs = ct.pack_fp4_to_uint8(vals)
    # their packer gives a rounded-to-zero negative value the sign bit (code 8): same value as our 0
    ours = pack_fp4(e2m1_codes(x))
    assert torch.equal(e2m1_values(unpack_fp4(theirs)), e2m1_values(unpack_fp4(ours)))
    nz = vals != 0
    assert torch.equal(unpack_fp4(theirs)[nz], unpack_fp4(ours)[nz])
