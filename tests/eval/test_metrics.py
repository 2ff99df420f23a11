import math

import pytest
import torch

from torchcompress.eval import cosine_similarity, mse, psnr, rmse, sqnr


def test_metrics_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    y = x + 0.01 * torch.randn(64, 32, generator=g)
    d = (x.double() - y.double())
    assert mse(x, y) == pytest.approx(float((d**2).mean()), rel=1e-12)
    assert rmse(x, y) == pytest.approx(math.sqrt(float((d**2).mean())), rel=1e-12)
    assert sqnr(x, y) == pytest.approx(20 * math.log10(float(x.double().norm() / d.norm())), rel=1e-12)
    peak = float(x.abs().max())
    assert psnr(x, y) == pytest.approx(10 * math.log10(peak**2 / float((d**2).mean())), rel=1e-12)
    assert psnr(x, y, peak=1.0) == pytest.approx(10 * math.log10(1.0 / float((d**2).mean())), rel=1e-12)
    cos = float((x.double().flatten() @ y.double().flatten()) / (x.double().norm() * y.double().norm()))
    assert cosine_similarity(x, y) == pytest.approx(cos, rel=1e-12)


def test_metrics_edge_cases():
    x = torch.randn(10)
    assert sqnr(x, x) == math.inf and psnr(x, x) == math.inf
    z = torch.zeros(10)
    assert sqnr(z, x) == -math.inf
    assert cosine_similarity(z, z) == 1.0 and cosine_similarity(z, x) == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        mse(torch.zeros(3), torch.zeros(4))


def test_sqnr_of_noise_at_known_level():
    # noise 10x smaller in norm than the signal is 20 dB by definition
    x = torch.tensor([3.0, 4.0], dtype=torch.float64)
    y = x + torch.tensor([0.3, 0.4], dtype=torch.float64)
    assert sqnr(x, y) == pytest.approx(20.0, abs=1e-9)


def test_chunked_sqnr_and_mse_equal_the_whole_tensor_ones():
    import math

    from torchcompress.eval.metrics import mse, sqnr, sqnr_and_mse

    torch.manual_seed(0)
    x = torch.randn(300, 37)
    y = x + 0.01 * torch.randn_like(x)
    s, m = sqnr_and_mse(x, y, chunk=1000)  # 11 chunks, the last partial
    assert math.isclose(s, sqnr(x, y), rel_tol=1e-12) and math.isclose(m, mse(x, y), rel_tol=1e-12)
    assert sqnr_and_mse(x, x) == (math.inf, 0.0)
    assert sqnr_and_mse(torch.zeros(5), torch.ones(5))[0] == -math.inf
