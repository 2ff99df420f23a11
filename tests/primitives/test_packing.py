"""Bit packing: exact round trips and byte equality with an independent bit-stream packer."""

from __future__ import annotations

import pytest
import torch

from torchcompress.errors import ConfigError
from torchcompress.primitives.packing import pack, packed_len, unpack

BITS = list(range(1, 9))
# K=1, K below/above/at multiples of 8 (the general path's word), of 4 and 2 (the fast paths),
# and a couple of realistic in_features.
KS = [1, 2, 3, 4, 5, 7, 8, 9, 13, 15, 16, 17, 31, 33, 63, 64, 65, 127, 576]


def oracle_pack_row(codes: list[int], bits: int) -> bytes:
    """Little-endian bit stream written one bit at a time: code i occupies bits [i*b, (i+1)*b)."""
    nbytes = -(-len(codes) * bits // 8)
    out = bytearray(nbytes)
    pos = 0
    for c in codes:
        assert 0 <= c < (1 << bits)
        for j in range(bits):
            if (c >> j) & 1:
                out[pos // 8] |= 1 << (pos % 8)
            pos += 1
    return bytes(out)


def oracle_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    rows = [oracle_pack_row(r, bits) for r in codes.tolist()]
    return torch.tensor([list(r) for r in rows], dtype=torch.uint8).reshape(codes.shape[0], -1)


def random_codes(shape, bits, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", KS)
def test_round_trip_and_length(bits, k):
    codes = random_codes((3, k), bits, seed=bits * 1000 + k)
    p = pack(codes, bits)
    assert p.dtype == torch.uint8
    assert p.shape == (3, -(-k * bits // 8)) == (3, packed_len(k, bits))
    back = unpack(p, bits, k)
    assert back.dtype == torch.uint8
    assert torch.equal(back, codes)


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_extreme_codes(bits):
    # all-ones and all-zeros and alternating patterns catch shift / mask mistakes
    k = 37
    top = (1 << bits) - 1
    for fill in (0, top):
        c = torch.full((2, k), fill, dtype=torch.uint8)
        assert torch.equal(unpack(pack(c, bits), bits, k), c)
    alt = torch.tensor([[top if i % 2 else 0 for i in range(k)]], dtype=torch.uint8)
    assert torch.equal(unpack(pack(alt, bits), bits, k), alt)
    assert torch.equal(pack(alt, bits), oracle_pack(alt, bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [1, 3, 5, 8, 11, 16, 21, 64, 67])
def test_bytes_match_oracle(bits, k):
    # covers the 2- and 4-bit fast paths, the 8-bit copy and the 64-bit-word path (1, 3, 5, 6, 7)
    codes = random_codes((4, k), bits, seed=7 * k + bits)
    assert torch.equal(pack(codes, bits), oracle_pack(codes, bits))


def test_known_4bit_layout_low_nibble_first():
    codes = torch.tensor([[0x1, 0x2, 0x3, 0x4, 0xF]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x0F]]


def test_known_2bit_and_3bit_layout():
    assert pack(torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0b11]]
    # 3-bit: codes 7,0,5 -> bits 111 000 101 -> stream 0b101000111 little endian
    assert pack(torch.tensor([[7, 0, 5]], dtype=torch.uint8), 3).tolist() == [[0b01000111, 0b1]]


@pytest.mark.parametrize("bits", BITS)
def test_leading_dims_and_non_contiguous(bits):
    codes = random_codes((2, 3, 19), bits, seed=bits)
    p = pack(codes, bits)
    assert p.shape == (2, 3, packed_len(19, bits))
    assert torch.equal(unpack(p, bits, 19), codes)
    # a transposed (non-contiguous) view packs exactly like its contiguous copy
    sq = random_codes((16, 12), bits, seed=bits + 50)
    nc = sq.t()
    assert not nc.is_contiguous()
    assert torch.equal(pack(nc, bits), pack(nc.contiguous(), bits))
    assert torch.equal(unpack(pack(nc, bits), bits, 16), nc)


def test_pack_does_not_alias_input():
    c = random_codes((2, 8), 8)
    p = pack(c, 8)
    p[0, 0] ^= 1
    assert not torch.equal(p, c)


@pytest.mark.parametrize("bad", [0, 9, -1, True, 4.0, "4", None])
def test_bad_bits_raise_config_error(bad):
    c = torch.zeros(1, 8, dtype=torch.uint8)
    with pytest.raises(ConfigError):
        pack(c, bad)
    with pytest.raises(ConfigError):
        unpack(c, bad, 8)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.float32])
def test_pack_rejects_non_uint8(dtype):
    with pytest.raises(ConfigError):
        pack(torch.zeros(1, 8, dtype=dtype), 4)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_unpack_rejects_wrong_packed_length(bits):
    p = pack(random_codes((2, 10), bits), bits)
    with pytest.raises(ConfigError):
        unpack(p, bits, 10 + 8)  # claims more codes than the bytes hold
    with pytest.raises(ConfigError):
        unpack(p[:, :-1], bits, 10)


def test_pack_rejects_codes_wider_than_bits():
    import torch

    from torchcompress.errors import ConfigError
    from torchcompress.primitives.packing import pack

    for bits in (2, 3, 4, 6):
        codes = torch.zeros(2, 9, dtype=torch.uint8)
        codes[1, 4] = 1 << bits
        with pytest.raises(ConfigError, match=f"{bits} bits"):
            pack(codes, bits)
