"""Hadamard matrices and the orthogonal rotations built from them (pure math, no modules).

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H H^T = n I``. QuaRot-style rotations use
``diag(s) H / sqrt(n)`` (``s`` random signs), which is orthogonal and spreads every outlier over all
coordinates. Orders ``k * 2^m`` are built as ``H_k (x) H_{2^m}`` (Kronecker; Sylvester's doubling for
the power of two) with a base ``H_k`` from these classical constructions:

- Sylvester: ``H_1 = [1]``, ``H_2n = [[H, H], [H, -H]]``.
- Paley I (q a prime power, q = 3 mod 4): order q + 1 from the Jacobsthal matrix of GF(q).
- Paley II (q a prime power, q = 1 mod 4): order 2 (q + 1) from the symmetric conference matrix.
- Williamson (n odd): four symmetric circulant +-1 matrices A, B, C, D of order n with
  A^2 + B^2 + C^2 + D^2 = 4n I give the order-4n Hadamard matrix
  ``[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]``.

Base orders: 12 (Paley I, q=11), 20 (I, 19), 28 (II, 13), 36 (II, 17), 40 (Sylvester x 20),
52 (II, 25 = GF(5^2)), 60 (I, 59), 108 (I, 107), 140 (I, 139), 156 (Williamson, n=39), 172 (Williamson,
n=43). 156 and 172 have no Paley construction (155, 171, 77, 85 are not prime powers); their Williamson
first rows were found by our own computer search, ``scripts/hadamard_search.py``. Every other order
without a base here gets the seeded random orthogonal fallback.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch

# base order -> (construction, q)
_BASES = {1: ("sylvester", 1), 12: ("paley1", 11), 20: ("paley1", 19), 28: ("paley2", 13), 36: ("paley2", 17),
          40: ("double", 20), 52: ("paley2", 25), 60: ("paley1", 59), 108: ("paley1", 107), 140: ("paley1", 139),
          156: ("williamson", 39), 172: ("williamson", 43)}
BASE_ORDERS = tuple(sorted(_BASES))

# Williamson matrices: first rows of the symmetric circulants A, B, C, D (order n = 39 for 156, 43 for 172),
# found by our own search, scripts/hadamard_search.py (meet in the middle over symmetric +-1 sequences with
# the power-spectral-density bound; deterministic, see its docstring): `hadamard_search.py 39` (row sums
# 9, 5, 5, 5; 18 s) and `hadamard_search.py 43:7,7,7,5` (row sums 7, 5, 7, 7; 14 min on a loaded machine).
# Verified exactly (H H^T = 4n I) by tests/primitives/test_hadamard.py.
_WILLIAMSON_ROWS = {
    39: (
        "++------+--+-+--++-++-++--+-+--+------+",
        "+-+-----+-+++--+++----+++--+++-+-----+-",
        "++---+--++----+-+-++++-+-+----++--+---+",
        "++-++-++---+-----+-++-+-----+---++-++-+",
    ),
    43: (
        "+-+++----+-++-++--++++++++--++-++-+----+++-",
        "+--+++--+----+-+--++-++-++--+-+----+--+++--",
        "++++-++++---+++---+--++--+---+++---++++-+++",
        "+-+-++--+-+-++++++-+----+-++++++-+-+--++-+-",
    ),
}


def _prime_power(q: int) -> tuple[int, int]:
    """(p, k) with q = p^k, p prime; ValueError otherwise."""
    for p in range(2, q + 1):
        if q % p == 0:
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            if r != 1:
                raise ValueError(f"{q} is not a prime power")
            return p, k
    raise ValueError(f"{q} is not a prime power")


def _poly_mulmod(a: tuple, b: tuple, mod: tuple, p: int) -> tuple:
    """Product of two polynomials over GF(p) (coefficient tuples, lowest first) modulo monic ``mod``."""
    k = len(mod) - 1
    prod = [0] * (2 * k - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            prod[i + j] = (prod[i + j] + x * y) % p
    for d in range(len(prod) - 1, k - 1, -1):  # reduce: x^d = -(mod[0..k-1]) x^(d-k)
        c = prod[d]
        if c:
            for i in range(k):
                prod[d - k + i] = (prod[d - k + i] - c * mod[i]) % p
            prod[d] = 0
    return tuple(prod[:k])


def _irreducible(p: int, k: int) -> tuple:
    """The first monic polynomial of degree k over GF(p) with no root and no factor of lower degree."""
    elems = list(itertools.product(range(p), repeat=k))
    for low in elems:
        mod = tuple(low) + (1,)
        # irreducible iff no monic polynomial of degree 1..k//2 divides it: check that the product of any two
        # nonzero field "elements" (polynomials of degree < k) is never zero mod ``mod`` (a field has no zero divisors)
        nz = [e for e in elems if any(e)]
        if all(any(_poly_mulmod(a, b, mod, p)) for a in nz for b in nz):
            return mod
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")


@lru_cache(maxsize=None)
def _field(q: int) -> tuple[list, torch.Tensor]:
    """GF(q)'s elements (coefficient tuples) and its quadratic character of differences:
    ``chi[i, j] = chi(a_i - a_j)`` (0 on the diagonal, +1 for a nonzero square, -1 otherwise)."""
    p, k = _prime_power(q)
    elems = list(itertools.product(range(p), repeat=k))
    if k == 1:
        sq = {((x * x) % p,) for x in range(1, p)}
    else:
        mod = _irreducible(p, k)
        sq = {_poly_mulmod(e, e, mod, p) for e in elems if any(e)}
    chi = torch.zeros(q, q, dtype=torch.int64)
    for i, a in enumerate(elems):
        for j, b in enumerate(elems):
            d = tuple((x - y) % p for x, y in zip(a, b))
            if any(d):
                chi[i, j] = 1 if d in sq else -1
    return elems, chi


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 (q = 3 mod 4): H = I + S, S = [[0, 1^T], [-1, Q]] skew (Q the Jacobsthal matrix)."""
    _, jac = _field(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return torch.eye(q + 1, dtype=torch.int64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) (q = 1 mod 4): the symmetric conference matrix C = [[0, 1^T], [1, Q]] with every
    0 replaced by [[1, -1], [-1, -1]] and every +-1 by +-[[1, 1], [1, -1]]."""
    _, jac = _field(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jac
    one = torch.tensor([[1, 1], [1, -1]])
    zero = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(c, one) + torch.kron((c == 0).long(), zero)


def _williamson(n: int) -> torch.Tensor:
    """Order 4n from the Williamson array of the stored symmetric circulants (row r = first row shifted right
    by r): ``[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]``."""
    def circulant(row: str) -> torch.Tensor:
        first = torch.tensor([1 if ch == "+" else -1 for ch in row], dtype=torch.int64)
        assert len(row) == n and set(row) <= {"+", "-"}
        return torch.stack([torch.roll(first, r) for r in range(n)])

    a, b, c, d = (circulant(r) for r in _WILLIAMSON_ROWS[n])
    return torch.cat([torch.cat(blocks, 1) for blocks in
                      ((a, b, c, d), (-b, a, -d, c), (-c, d, a, -b), (-d, -c, b, a))], 0)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@lru_cache(maxsize=None)
def _base(k: int) -> torch.Tensor:
    how, q = _BASES[k]
    if how == "sylvester":
        return _sylvester(1)
    if how == "double":
        return torch.kron(_sylvester(2), _base(q))
    if how == "williamson":
        return _williamson(q)
    return _paley1(q) if how == "paley1" else _paley2(q)


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(k, 2^m) with n = k * 2^m and k a base order we build (the largest power of two), else None."""
    if n < 1:
        return None
    for k in sorted(BASE_ORDERS, reverse=True):
        if n % k == 0:
            p = n // k
            if p & (p - 1) == 0:
                return k, p
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """A +-1 Hadamard matrix of order n (int64), ``H_k (x) H_{2^m}``; ValueError when n has no known base."""
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} is built here (orders k * 2^m, k in {BASE_ORDERS})")
    k, p = f
    return torch.kron(_base(k), _sylvester(p))


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal matrix (float64): QR of a Gaussian, signs fixed so it is Haar-distributed."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """``diag(s) H / sqrt(n)`` (float64, orthogonal) with seeded random signs s; the random orthogonal
    fallback for orders without a Hadamard matrix here."""
    if hadamard_factors(n) is None:
        return random_orthogonal(n, seed)
    g = torch.Generator().manual_seed(int(seed))
    s = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1
    return (s.unsqueeze(1) * hadamard_matrix(n)).to(torch.float64) / math.sqrt(n)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_p`` along the last dim (p a power of two, Sylvester's H, unnormalised) in log2(p) butterflies."""
    shape, p = x.shape, x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {p}")
    h = 1
    while h < p:
        y = x.reshape(*shape[:-1], p // (2 * h), 2, h)  # the "2" axis is bit log2(h) of the index
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(shape)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ hadamard_matrix(n) / sqrt(n)`` along the last dim without forming the n x n matrix:
    with n = k p and x viewed as X (k, p), ``x @ (H_k (x) H_p) = H_k^T X H_p`` (a fast transform for H_p)."""
    n = x.shape[-1]
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} is built here (orders k * 2^m, k in {BASE_ORDERS})")
    k, p = f
    y = fwht(x.reshape(*x.shape[:-1], k, p))  # (..., k, p) = X H_p
    if k > 1:
        hk = _base(k).to(dtype=x.dtype, device=x.device)
        y = torch.einsum("ia,...ib->...ab", hk, y)  # H_k^T X H_p
    return y.reshape(x.shape) / math.sqrt(n)
