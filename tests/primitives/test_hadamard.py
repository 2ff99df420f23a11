"""Hadamard matrices (Sylvester, Paley I/II, Williamson), random rotations and the fast transform."""

import math

import pytest
import torch

from torchcompress.primitives.hadamard import (BASE_ORDERS, fwht, hadamard_factors, hadamard_matrix,
                                               hadamard_transform, random_hadamard, random_orthogonal)


@pytest.mark.parametrize("k", BASE_ORDERS)
def test_base_orders_are_hadamard(k):
    h = hadamard_matrix(k)
    assert h.shape == (k, k) and h.dtype == torch.int64
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.int64))  # exact: integers


@pytest.mark.parametrize("n", [2, 64, 576, 1536, 96, 160, 224, 416, 480, 864, 1120, 2048, 312, 688])
def test_products_with_powers_of_two_are_hadamard(n):
    h = hadamard_matrix(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.int64))


def test_williamson_rows_are_symmetric_circulants():
    from torchcompress.primitives.hadamard import _WILLIAMSON_ROWS
    for n, rows in _WILLIAMSON_ROWS.items():
        assert 4 * n in BASE_ORDERS and len(rows) == 4
        for r in rows:
            assert len(r) == n and all(r[i] == r[n - i] for i in range(1, n))


def test_factors_pick_known_bases():
    assert hadamard_factors(576) == (36, 16)  # SmolLM2's hidden size
    assert hadamard_factors(1536) == (12, 128)  # its intermediate size
    assert hadamard_factors(64) == (1, 64)
    assert hadamard_factors(28 * 8) == (28, 8)
    assert hadamard_factors(156) == (156, 1)  # Williamson, n = 39
    assert hadamard_factors(172 * 4) == (172, 4)  # Williamson, n = 43
    assert hadamard_factors(11008) == (172, 64)  # Llama-2-7B's intermediate size
    for n in (0, 3, 7, 100, 4 * 47):  # no base
        assert hadamard_factors(n) is None
        with pytest.raises(ValueError):
            hadamard_matrix(n)


def _naive_paley1(q: int) -> torch.Tensor:
    """Paley I for a prime q written directly from the definition (Legendre symbol by Euler's criterion)."""
    def chi(x):
        x %= q
        return 0 if x == 0 else (1 if pow(x, (q - 1) // 2, q) == 1 else -1)

    h = torch.empty(q + 1, q + 1, dtype=torch.int64)
    h[0, :] = 1
    h[1:, 0] = -1
    for i in range(q):
        for j in range(q):
            h[i + 1, j + 1] = chi(i - j) + (1 if i == j else 0)
    return h


@pytest.mark.parametrize("q", [11, 19, 59])
def test_paley1_matches_its_definition(q):
    assert torch.equal(hadamard_matrix(q + 1), _naive_paley1(q))


def test_random_hadamard_is_orthogonal_signed_hadamard():
    n = 576
    q = random_hadamard(n, seed=7)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    signs = torch.sign(q[:, 0]) * torch.sign(hadamard_matrix(n)[:, 0].double())  # q = diag(s) H / sqrt(n)
    torch.testing.assert_close(q, signs.unsqueeze(1) * hadamard_matrix(n).double() / math.sqrt(n))
    assert torch.equal(q, random_hadamard(n, seed=7))
    assert not torch.equal(q, random_hadamard(n, seed=8))


def test_fallback_is_a_seeded_random_orthogonal():
    n = 100  # 100 = 25 * 4: no Hadamard base here
    q = random_hadamard(n, seed=3)
    assert torch.equal(q, random_orthogonal(n, 3))
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not torch.equal(q, random_orthogonal(n, 4))


@pytest.mark.parametrize("n", [1, 2, 64, 1024])
def test_fwht_equals_sylvester_product(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ hadamard_matrix(n).double(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [12, 576, 1536, 40 * 4, 52 * 2, 140, 156, 172 * 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hadamard_transform_equals_dense_product(n, dtype):
    x = torch.randn(4, n, dtype=dtype)
    want = x.double() @ hadamard_matrix(n).double() / math.sqrt(n)
    # float32: measured max error 1.5e-6 over 20 draws of unit-normal inputs (log2 butterflies + a k-term sum)
    tol = 1e-12 if dtype == torch.float64 else 3e-6
    torch.testing.assert_close(hadamard_transform(x).double(), want, rtol=0, atol=tol)
    with pytest.raises(ValueError):
        fwht(torch.zeros(3))
