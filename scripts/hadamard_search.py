"""Search for Williamson matrices of odd order n (Hadamard order 4n; n = 39 -> 156, n = 43 -> 172).

Williamson: four symmetric circulant +-1 matrices A, B, C, D of order n with A^2 + B^2 + C^2 + D^2 = 4n I.
Equivalently their periodic autocorrelations sum to zero at every shift s = 1..(n-1)/2, or their power
spectral densities sum to 4n at every frequency. Then

    H = [[ A,  B,  C,  D],
         [-B,  A, -D,  C],
         [-C,  D,  A, -B],
         [-D, -C,  B,  A]]

is a Hadamard matrix of order 4n (``torchcompress/primitives/hadamard.py``, construction "williamson").

Method (deterministic, no randomness):

1. Enumerate every symmetric +-1 sequence with first entry +1 (the m = (n-1)/2 symmetric pairs free: 2^m of
   them). With x_0 = +1 the row sum is n - 4k (k = number of negative pairs), so it is = n (mod 4) and its
   sign is fixed by its absolute value; negating a Williamson matrix keeps the family Williamson, so every
   solution has a representative with all first entries +1.
2. Their DFT is real (symmetric sequences): X(k) = 1 + 2 sum_i x_i cos(2 pi i k / n); keep only those with
   X(k)^2 <= 4n at every frequency (a sum of four PSDs equals 4n) whose |row sum| appears in some
   decomposition 4n = a^2 + b^2 + c^2 + d^2 into odd squares.
3. For each decomposition a >= b >= c >= d (the four matrices may be permuted freely), meet in the middle:
   pairs (A, B) from the buckets of row sums a, b with PSD_A + PSD_B <= 4n everywhere (A the smallest of
   its orbit under the multipliers x_i -> x_{ti}, which map Williamson quadruples to Williamson quadruples) are keyed by the
   integer vector PAF_A + PAF_B (a 64-bit hash of it); pairs (C, D) likewise by -(PAF_C + PAF_D); equal keys
   are verified exactly (PAF sum zero, then H H^T = 4n I).

Decompositions are tried cheapest first (the streamed pair with the fewest pairs); an argument
``43:7,7,7,5`` restricts order 43 to the listed decompositions (several separated by ':').

    PYTHONPATH=. python scripts/hadamard_search.py 39            # row sums 9,5,5,5: 18 s
    PYTHONPATH=. python scripts/hadamard_search.py 43:7,7,7,5    # row sums 7,5,7,7: 14 min (loaded machine)

print, per order, the candidate counts, pairs examined, time, and the four first rows as +/- strings (the
rows stored in torchcompress/primitives/hadamard.py). Measured for n = 43 (2 shared cores, nice 19):
(13,1,1,1) and (9,9,3,1) have no solution (exhausted in 543 s and 810 s); (11,5,5,1) and (11,7,1,1) were not
searched to the end. n = 35 (no Williamson matrices exist) is exhausted with no match, as a check.
"""

from __future__ import annotations

import itertools
import sys
import time

import numpy as np


def odd_square_decompositions(t: int) -> list[tuple[int, int, int, int]]:
    """a >= b >= c >= d > 0, all odd, a^2 + b^2 + c^2 + d^2 = t."""
    odd = [v for v in range(1, int(t ** 0.5) + 1) if v % 2]
    out = []
    for a, b, c, d in itertools.combinations_with_replacement(sorted(odd, reverse=True), 4):
        if a * a + b * b + c * c + d * d == t:
            out.append((a, b, c, d))
    return out


def full_rows(half: np.ndarray, n: int) -> np.ndarray:
    """(N, m) pair signs -> (N, n) symmetric sequences with x_0 = +1, x_i = x_{n-i} = half[:, i-1]."""
    m = (n - 1) // 2
    rows = np.ones((half.shape[0], n), dtype=np.int64)
    rows[:, 1:m + 1] = half
    rows[:, n - m:] = half[:, ::-1]
    return rows


def paf(rows: np.ndarray, n: int) -> np.ndarray:
    """Periodic autocorrelation at shifts 1..(n-1)/2 (symmetric in s <-> n - s)."""
    m = (n - 1) // 2
    return np.stack([(rows * np.roll(rows, -s, axis=1)).sum(1) for s in range(1, m + 1)], 1)


def candidates(n: int, sums: set[int], chunk: int = 1 << 16):
    """Symmetric sequences (x_0 = +1) passing the PSD bound whose |row sum| is in ``sums``:
    dict |row sum| -> (half signs (N, m) int8, PSD at k = 0..m (N, m+1) float64)."""
    m = (n - 1) // 2
    cos = 2 * np.cos(2 * np.pi * np.outer(np.arange(1, m + 1), np.arange(0, m + 1)) / n)  # (m, m+1)
    bits = np.arange(m, dtype=np.int64)
    keep_h, keep_p = [], []
    for start in range(0, 1 << m, chunk):
        idx = np.arange(start, min(start + chunk, 1 << m), dtype=np.int64)
        half = 1 - 2 * ((idx[:, None] >> bits) & 1)  # (N, m) in {+1, -1}
        x = 1 + half @ cos  # real DFT at k = 0..m
        psd = x * x
        ok = (psd <= 4 * n + 1e-6).all(1) & np.isin(np.abs(np.rint(x[:, 0])).astype(np.int64), list(sums))
        keep_h.append(half[ok].astype(np.int8))
        keep_p.append(psd[ok])
    half = np.concatenate(keep_h)
    psd = np.concatenate(keep_p)
    rs = np.abs(1 + 2 * half.astype(np.int64).sum(1))
    return {s: (half[rs == s], psd[rs == s]) for s in sorted(sums)}


def canonical_under_multipliers(half: np.ndarray, n: int) -> np.ndarray:
    """Mask of the sequences that are the smallest (as a bit code) in their orbit under the multipliers
    x_i -> x_{t i mod n}, t a unit mod n (t and -t act alike on symmetric sequences). A multiplier maps a
    Williamson quadruple to a Williamson quadruple, so the first matrix may be taken canonical."""
    m = (n - 1) // 2
    weights = (1 << np.arange(m, dtype=np.int64))
    bits = (half < 0).astype(np.int64)
    code = bits @ weights
    best = code.copy()
    for t in range(2, n):
        if np.gcd(t, n) != 1:
            continue
        j = (t * np.arange(1, m + 1)) % n
        j = np.minimum(j, n - j) - 1  # the pair index that position i maps to
        best = np.minimum(best, bits[:, j] @ weights)
    return code == best


def _hash(keys: np.ndarray, mult: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (keys.astype(np.uint64) * mult).sum(1, dtype=np.uint64)


def pair_chunks(pa, pb, psd_a, psd_b, n, same, mult, chunk=512, dense=32):
    """Yield (i, j, hash of PAF_a[i] + PAF_b[j]) over all pairs with PSD_a[i] + PSD_b[j] <= 4n at every
    frequency (i <= j when both come from one bucket), a chunk of i at a time. The bound is checked one
    frequency at a time on a dense (chunk, len(b)) mask for the first ``dense`` frequencies, then on the
    surviving pairs only."""
    lim = np.float32(4 * n + 1e-3)  # float32 PSDs (error ~1e-5): a looser bound, every match is verified exactly
    ha = _hash(pa, mult)  # hashing is linear (mod 2^64): hash(a + b) = hash(a) + hash(b)
    hb = _hash(pb, mult)
    ka = psd_a.shape[1]
    for s in range(0, len(pa), chunk):
        e = min(s + chunk, len(pa))
        slack = lim - psd_a[s:e]
        ok = psd_b[None, :, 1] <= slack[:, 1, None]
        for k in range(2, min(2 + dense - 1, ka)):
            ok &= psd_b[None, :, k] <= slack[:, k, None]
        if same:
            ok &= np.arange(s, e)[:, None] <= np.arange(len(pb))[None, :]
        i, j = np.nonzero(ok)
        for k in range(min(2 + dense - 1, ka), ka):
            keep = psd_b[j, k] <= slack[i, k]
            i, j = i[keep], j[keep]
        i = i + s
        with np.errstate(over="ignore"):
            yield i.astype(np.int32), j.astype(np.int32), ha[i] + hb[j]


def williamson_hadamard(a, b, c, d) -> np.ndarray:
    """The Williamson array from four first rows (circulants: row r is the first row shifted right by r)."""
    circ = lambda r: np.stack([np.roll(r, k) for k in range(len(r))])  # noqa: E731
    A, B, C, D = (circ(np.asarray(r, dtype=np.int64)) for r in (a, b, c, d))
    return np.block([[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]])


def plan(dec, sizes):
    """Split a decomposition into a stored pair (first entry canonical: small) and a streamed pair (all
    pairs: the cost); stream the pair of buckets with the fewest pairs."""
    best = None
    for x, y in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)):
        z, w = (k for k in range(4) if k not in (x, y))
        cost = sizes[dec[z]] * sizes[dec[w]] / (2 if dec[z] == dec[w] else 1)
        if best is None or cost < best[0]:
            best = (cost, (dec[x], dec[y], dec[z], dec[w]))
    return best


def search(n: int, verbose: bool = True, only=None):
    t0 = time.time()
    m = (n - 1) // 2
    decs = odd_square_decompositions(4 * n)
    sums = {v for dec in decs for v in dec}
    cand = candidates(n, sums)
    stats = {"n": n, "decompositions": decs, "sequences": 1 << m,
             "after_psd": {s: len(cand[s][0]) for s in cand}, "pairs": 0}
    if verbose:
        print(f"n={n}: 4n={4 * n} = sums of odd squares {decs}; 2^{m} symmetric sequences, after the PSD "
              f"bound by |row sum|: {stats['after_psd']} ({time.time() - t0:.1f}s)", flush=True)
    pafs = {s: paf(full_rows(cand[s][0].astype(np.int64), n), n) for s in cand}
    psds = {s: cand[s][1].astype(np.float32) for s in cand}
    canon = {s: np.nonzero(canonical_under_multipliers(cand[s][0], n))[0] for s in cand}
    stats["canonical"] = {s: len(canon[s]) for s in cand}
    if verbose:
        print(f"  canonical under multipliers, by |row sum|: {stats['canonical']}", flush=True)
    # fixed pseudo-random odd 64-bit multipliers (seeded: the search is deterministic)
    mult = np.random.default_rng(0).integers(0, 2 ** 63, m, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    sizes = {s: len(cand[s][0]) for s in cand}
    todo = sorted((plan(dec, sizes) for dec in decs if only is None or dec in only))  # cheapest first
    for _, dec in todo:
        a, b, c, d = dec
        # store the (A, B) side sorted by key; stream the (C, D) side against it (key -(PAF_C + PAF_D))
        # A is canonical under the multipliers (all B: no i <= j restriction then)
        ca = canon[a]
        parts = list(pair_chunks(pafs[a][ca], pafs[b], psds[a][ca], psds[b], n, False, mult))
        i1 = ca[np.concatenate([p[0] for p in parts])]
        j1 = np.concatenate([p[1] for p in parts])
        h1 = np.concatenate([p[2] for p in parts])
        del parts
        order = np.argsort(h1, kind="stable")
        i1, j1, h1 = i1[order], j1[order], h1[order]
        del order
        n2 = 0
        stats["pairs"] += len(h1)
        for i2, j2, h2 in pair_chunks(pafs[c], pafs[d], psds[c], psds[d], n, c == d, mult):
            n2 += len(h2)
            with np.errstate(over="ignore"):
                h2 = np.uint64(0) - h2
            pos = np.searchsorted(h1, h2)
            hit = np.nonzero((pos < len(h1)) & (h1[np.minimum(pos, len(h1) - 1)] == h2))[0]
            for q in hit:  # in pair order: deterministic
                p = pos[q]
                while p < len(h1) and h1[p] == h2[q]:
                    rows = [full_rows(cand[s][0][[idx]].astype(np.int64), n)[0]
                            for s, idx in ((a, i1[p]), (b, j1[p]), (c, i2[q]), (d, j2[q]))]
                    if not paf(np.stack(rows), n).sum(0).any():
                        h = williamson_hadamard(*rows)
                        assert (h @ h.T == 4 * n * np.eye(4 * n, dtype=np.int64)).all()
                        stats["pairs"] += n2
                        stats["seconds"] = time.time() - t0
                        stats["decomposition"] = dec
                        if verbose:
                            print(f"  {dec}: {len(h1)} (A,B) pairs, {n2} (C,D) pairs streamed until the hit "
                                  f"({time.time() - t0:.1f}s)", flush=True)
                        return rows, stats
                    p += 1
        stats["pairs"] += n2
        if verbose:
            print(f"  {dec}: {len(h1)} (A,B) pairs, {n2} (C,D) pairs, no match ({time.time() - t0:.1f}s)",
                  flush=True)
    stats["seconds"] = time.time() - t0
    return None, stats


def main(argv):
    """Arguments: orders n, each optionally restricted to some decompositions: 43:9,9,3,1:11,5,5,1."""
    for arg in argv or ["39", "43"]:
        n, *decs = arg.split(":")
        n = int(n)
        only = [tuple(int(v) for v in d.split(",")) for d in decs] or None
        rows, stats = search(n, only=only)
        if rows is None:
            print(f"n={n}: NO solution; {stats}", flush=True)
            continue
        print(f"n={n} (order {4 * n}): found in {stats['seconds']:.1f}s, row sums {stats['decomposition']}, "
              f"{stats['pairs']} pairs keyed")
        for name, r in zip("ABCD", rows):
            print(f'  {name} = "{"".join("+" if v > 0 else "-" for v in r)}"')
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
