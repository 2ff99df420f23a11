"""Hostile .gguf files, hand-made in the spirit of llama.cpp's tests/test-gguf.cpp, plus hypothesis fuzzers.

Every case is a precise byte layout built here (no writer of ours involved), so each names one
defect: bad magic/version, huge counts, duplicate keys and tensor names, bad alignment, unknown
value and tensor types, shapes not divisible by the block size, offsets past the end, overlapping
tensors, string lengths of 2^63. Invariant: :func:`read_gguf` raises FormatError (naming the file)
or returns tables whose every tensor lies inside the file; no other exception, no hang, no
allocation beyond the file's size.
"""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.reliability._fuzz import fuzz, no_hang
from torchcompress.errors import FormatError
from torchcompress.formats.gguf_read import read_gguf

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
Q4_0, Q8_0, Q4_K, F32T = 2, 8, 12, 0


def s(text: str | bytes, length: int | None = None) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b) if length is None else length) + b


def kv(key, vtype, payload: bytes, key_len=None) -> bytes:
    return s(key, key_len) + struct.pack("<I", vtype) + payload


def tinfo(name, dims, ttype, offset, n_dims=None, name_len=None) -> bytes:
    return (s(name, name_len) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, offset))


def gguf(kvs=(), tensors=(), data=b"", *, magic=b"GGUF", version=3, n_kv=None, n_tensors=None, align=32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * ((align - len(head) % align) % align) + data


ALIGN = kv("general.alignment", U32, struct.pack("<I", 64))
NAME = kv("general.name", STR, s("tiny"))
T_OK = tinfo("w", (32, 2), Q8_0, 0)  # 2 rows of one Q8_0 block (34 bytes each)
DATA_OK = bytes(68) + bytes(28)


def test_valid_reference_file_reads(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(gguf([NAME], [T_OK, tinfo("b", (8,), F32T, 96)], DATA_OK + bytes(32)))
    g = read_gguf(p)
    assert g.value("general.name") == "tiny"
    assert g.tensors["w"].shape == (2, 32) and g.tensors["w"].nbytes == 68
    assert g.tensors["b"].offset == g.data_offset + 96


CASES = {
    # header
    "empty file": b"",
    "bad magic": gguf(magic=b"GGML"),
    "version 0": gguf(version=0),
    "version 1": gguf(version=1),
    "future version": gguf(version=4),
    "version 2^32-1": gguf(version=2**32 - 1),
    "n_tensors 2^63": gguf(n_tensors=2**63),
    "n_tensors 2^64-1": gguf(n_tensors=2**64 - 1),
    "n_kv 2^63": gguf(n_kv=2**63),
    "n_kv one more than present": gguf([NAME], n_kv=2),
    "n_tensors one more than present": gguf([NAME], [T_OK], DATA_OK, n_tensors=2),
    # metadata
    "key length 2^63": gguf([kv("k", U8, b"\1", key_len=2**63)]),
    "key length 2^64-1": gguf([kv("k", U8, b"\1", key_len=2**64 - 1)]),
    "key not UTF-8": gguf([kv(b"\xff\xfe", U8, b"\1")]),
    "string value length 2^63": gguf([kv("general.name", STR, s("x", 2**63))]),
    "string value longer than the file": b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv("general.name", STR, s("abc", 4)),
    "unknown value type 13": gguf([kv("k", 13, b"\0" * 8)]),
    "unknown value type 2^32-1": gguf([kv("k", 2**32 - 1, b"\0" * 8)]),
    "duplicate key": gguf([NAME, NAME]),
    "array count 2^63": gguf([kv("a", ARR, struct.pack("<IQ", U32, 2**63))]),
    "array of strings count 2^62": gguf([kv("a", ARR, struct.pack("<IQ", STR, 2**62))]),
    "array item string length 2^63": gguf([kv("a", ARR, struct.pack("<IQ", STR, 1) + s("x", 2**63))]),
    "nested array": gguf([kv("a", ARR, struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", U8, 1) + b"\1")]),
    "array of unknown type": gguf([kv("a", ARR, struct.pack("<IQ", 99, 1) + b"\0" * 8)]),
    "alignment 0": gguf([kv("general.alignment", U32, struct.pack("<I", 0))], [T_OK], DATA_OK),
    "alignment not a power of two": gguf([kv("general.alignment", U32, struct.pack("<I", 48))], [T_OK], DATA_OK),
    "alignment of the wrong type": gguf([kv("general.alignment", STR, s("32"))], [T_OK], DATA_OK),
    "alignment u64": gguf([kv("general.alignment", U64, struct.pack("<Q", 32))], [T_OK], DATA_OK),
    # tensor table
    "tensor name length 2^63": gguf([], [tinfo("w", (32, 2), Q8_0, 0, name_len=2**63)], DATA_OK),
    "duplicate tensor name": gguf([], [T_OK, tinfo("w", (32, 2), Q8_0, 96)], DATA_OK * 2),
    "n_dims 0": gguf([], [tinfo("w", (), Q8_0, 0)], DATA_OK),
    "n_dims 5": gguf([], [tinfo("w", (32, 1, 1, 1, 2), Q8_0, 0)], DATA_OK),
    "n_dims 2^32-1": gguf([], [tinfo("w", (32, 2), Q8_0, 0, n_dims=2**32 - 1)], DATA_OK),
    "dimension 0": gguf([], [tinfo("w", (32, 0), Q8_0, 0)], DATA_OK),
    "dimension 2^63": gguf([], [tinfo("w", (32, 2**63), Q8_0, 0)], DATA_OK),
    "dimension past the file": gguf([], [tinfo("w", (2**32, 2**32, 2**32, 2**32), F32T, 0)], DATA_OK),
    "dimensions each in range, product past the file": gguf([], [tinfo("w", (150, 150, 150, 150), F32T, 0)], DATA_OK),
    "unknown tensor type 99": gguf([], [tinfo("w", (32, 2), 99, 0)], DATA_OK),
    "removed tensor type Q4_2 (4)": gguf([], [tinfo("w", (32, 2), 4, 0)], DATA_OK),
    "row not a multiple of the Q8_0 block": gguf([], [tinfo("w", (33, 2), Q8_0, 0)], DATA_OK),
    "row not a multiple of the Q4_K super-block": gguf([], [tinfo("w", (128, 2), Q4_K, 0)], bytes(512)),
    "offset not aligned": gguf([], [tinfo("w", (32, 2), Q8_0, 8)], DATA_OK),
    "offset not aligned to general.alignment": gguf([ALIGN], [tinfo("w", (32, 2), Q8_0, 32)], bytes(128)),
    "offset past the end": gguf([], [tinfo("w", (32, 2), Q8_0, 2**20)], DATA_OK),
    "offset 2^64-32 (wraps when added)": gguf([], [tinfo("w", (32, 2), Q8_0, 2**64 - 32)], DATA_OK),
    "data one byte short": gguf([], [T_OK], bytes(67)),
    "no data section": gguf([], [T_OK]),
    "overlapping tensors": gguf([], [T_OK, tinfo("v", (32, 2), Q8_0, 32)], DATA_OK + bytes(64)),
}


# what the error must say (the reason, not just any FormatError); cases not listed: any FormatError
REASONS = {
    "empty file": "too small", "bad magic": "bad magic", "version 0": "version 0", "version 1": "version 1",
    "future version": "version 4", "n_tensors 2^63": "file is too small", "n_kv 2^63": "file is too small",
    "key length 2^63": "exceeds the file", "string value length 2^63": "exceeds the file",
    "string value longer than the file": "string length 4 exceeds", "key not UTF-8": "UTF-8",
    "unknown value type 13": "unknown value type", "duplicate key": "duplicate metadata key",
    "array count 2^63": "does not fit", "array item string length 2^63": "exceeds the file",
    "nested array": "ARRAY", "alignment 0": "alignment", "alignment not a power of two": "alignment",
    "alignment of the wrong type": "alignment", "tensor name length 2^63": "exceeds the file",
    "duplicate tensor name": "duplicate tensor name", "n_dims 0": "dimensions", "n_dims 5": "dimensions",
    "dimension 0": "bad dimension", "dimension 2^63": "bad dimension", "unknown tensor type 99": "ggml type 99",
    "row not a multiple of the Q8_0 block": "not a multiple", "row not a multiple of the Q4_K super-block": "not a multiple",
    "offset not aligned": "not aligned", "offset not aligned to general.alignment": "not aligned to 64",
    "offset past the end": "beyond the end", "offset 2^64-32 (wraps when added)": "beyond the end",
    "data one byte short": "beyond the end", "dimensions each in range, product past the file": "beyond the end",
    "overlapping tensors": "overlap",
}


@pytest.mark.parametrize("name", CASES)
def test_hand_made_hostile_file(tmp_path, name):
    blob = CASES[name]
    p = tmp_path / "hostile.gguf"
    p.write_bytes(blob)
    tracemalloc.start()
    try:
        with no_hang(5), pytest.raises(FormatError) as ei:
            read_gguf(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(p) in str(ei.value) and len(str(ei.value).splitlines()) == 1
    assert REASONS.get(name, "") in str(ei.value)
    assert peak < 1 << 20, f"reading a {len(blob)}-byte hostile file allocated {peak} bytes"


def test_version_2_and_3_read(tmp_path):
    for v in (2, 3):
        p = tmp_path / f"v{v}.gguf"
        p.write_bytes(gguf([NAME], [T_OK], DATA_OK, version=v))
        assert read_gguf(p).version == v


def test_not_a_file(tmp_path):
    with pytest.raises(FormatError):
        read_gguf(tmp_path)
    with pytest.raises(FormatError):
        read_gguf(tmp_path / "missing.gguf")


# ---------------------------------------------------------------------------------------------
# fuzzers
# ---------------------------------------------------------------------------------------------


def check_reads_or_format_error(path, size: int):
    with no_hang(10):
        try:
            g = read_gguf(path)
        except FormatError:
            return
        for name, t in g.tensors.items():
            assert 0 <= t.offset and t.offset + t.nbytes <= size, name
            assert g.tensor_bytes(name).numel() == t.nbytes


_U64 = st.sampled_from([0, 1, 2, 31, 32, 33, 255, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)
_U32 = st.sampled_from([0, 1, 2, 3, 4, 8, 12, 13, 14, 30, 31, 99, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)


@st.composite
def structured_files(draw):
    """Well-formed structure with hostile numbers: counts, lengths, types, dims, offsets."""
    kvs = []
    for i in range(draw(st.integers(0, 3))):
        vtype = draw(st.integers(0, 14))
        payload = draw(st.sampled_from([
            b"", b"\1", struct.pack("<I", draw(_U32)), struct.pack("<Q", draw(_U64)),
            s("v", draw(_U64)), s("value"), struct.pack("<IQ", draw(_U32), draw(_U64)) + bytes(draw(st.integers(0, 40))),
        ]))
        kvs.append(kv(draw(st.sampled_from(["general.alignment", "general.name", f"k{i}", "k0"])), vtype, payload))
    tensors = []
    for i in range(draw(st.integers(0, 3))):
        nd = draw(st.integers(1, 4))
        dims = tuple(draw(st.sampled_from([1, 2, 32, 33, 256, 2**32, 2**63]) | st.integers(0, 600)) for _ in range(nd))
        ttype = draw(st.sampled_from([0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 30]) | _U32)
        offset = draw(st.sampled_from([0, 32, 64, 96, 1024]) | _U64)
        n_dims = draw(st.none() | _U32)
        tensors.append(tinfo(draw(st.sampled_from(["w", "v", f"t{i}"])), dims, ttype, offset, n_dims=n_dims))
    data = bytes(draw(st.integers(0, 2048)))
    return gguf(kvs, tensors, data, version=draw(st.sampled_from([3, 3, 3, 2, 1, 4])),
                n_kv=draw(st.none() | _U64), n_tensors=draw(st.none() | _U64))


@fuzz(150)
@given(blob=structured_files())
def test_fuzz_structured(tmp_path_factory, blob):
    p = tmp_path_factory.getbasetemp() / "fuzz-structured.gguf"
    p.write_bytes(blob)
    check_reads_or_format_error(p, len(blob))


_SEED = gguf([NAME, kv("a", ARR, struct.pack("<IQ", U32, 3) + struct.pack("<3I", 1, 2, 3)),
              kv("s", ARR, struct.pack("<IQ", STR, 2) + s("x") + s("yz")), ALIGN],
             [tinfo("w", (32, 2), Q8_0, 0), tinfo("b", (8,), F32T, 128)], bytes(256), align=64)


@fuzz(200)
@given(data=st.data())
def test_fuzz_bytes(tmp_path_factory, data):
    """Random byte edits of a small valid file that uses every header feature (arrays, strings, alignment)."""
    b = bytearray(_SEED)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.sampled_from([0, 0xFF, 0x7F, 0x80]) | st.integers(0, 255))
    if data.draw(st.booleans()):
        b = b[: data.draw(st.integers(0, len(b)))]
    p = tmp_path_factory.getbasetemp() / "fuzz-bytes.gguf"
    p.write_bytes(bytes(b))
    check_reads_or_format_error(p, len(b))
