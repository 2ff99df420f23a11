"""Parse a .gguf defensively: every count, length and offset is checked against the file size.

A truncated, corrupted or hostile file raises :class:`~torchcompress.errors.FormatError` naming the
file and the field; nothing allocates more than the file could hold, no loop runs longer than the
file's bytes allow, so a bad file cannot crash or hang the reader.

    >>> g = read_gguf("model.gguf")
    >>> g.kv["llama.block_count"].value, g.tensors["blk.0.attn_q.weight"].qtype
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FormatError
from ..primitives.gguf_common import LAYOUTS, GGMLType
from .gguf_file import DEFAULT_ALIGNMENT, KV, MAGIC, SCALAR_FMT, VType

MAX_DIMS = 4


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first)
    qtype: GGMLType
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    kv: dict[str, KV]
    tensors: dict[str, TensorInfo]  # in file order
    alignment: int
    data_offset: int
    file_size: int

    def value(self, key: str, default=None):
        kv = self.kv.get(key)
        return default if kv is None else kv.value

    def tensor_bytes(self, name: str) -> torch.Tensor:
        """The raw bytes of one tensor (a uint8 copy; the file is not kept open)."""
        t = self.tensors[name]
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            data = f.read(t.nbytes)
        if len(data) != t.nbytes:
            raise FormatError(self.path, f"tensor {name!r}: file shrank while reading")
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


class _Cursor:
    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def fail(self, what: str):
        raise FormatError(self.path, f"{what} (at byte {self.pos} of {self.size})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated: {what} needs {n} bytes")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def u32(self, what):
        return self.unpack("<I", what)[0]

    def u64(self, what):
        return self.unpack("<Q", what)[0]

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        if n > self.size - self.pos:
            self.fail(f"{what}: string length {n} exceeds the file")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what}: not valid UTF-8")

    def remaining(self) -> int:
        return self.size - self.pos


_U64 = struct.Struct("<Q").unpack_from


def _string_array(c: _Cursor, n: int) -> list[str] | None:
    """``n`` strings from ``c`` in one tight loop (a tokenizer holds ~50k), or None at the first bad
    length or UTF-8 sequence (the caller re-reads item by item for the precise error)."""
    buf, pos, size, out = c.buf, c.pos, c.size, []
    try:
        for _ in range(n):
            if pos + 8 > size:
                return None
            end = pos + 8 + _U64(buf, pos)[0]
            if end > size:
                return None
            out.append(buf[pos + 8:end].decode("utf-8"))
            pos = end
    except UnicodeDecodeError:
        return None
    c.pos = pos
    return out


def _vtype(c: _Cursor, raw: int, what: str) -> VType:
    try:
        return VType(raw)
    except ValueError:
        c.fail(f"{what}: unknown value type {raw}")


def _read_value(c: _Cursor, vt: VType, key: str, depth: int = 0):
    if vt == VType.STRING:
        return c.string(f"value of {key!r}"), None
    if vt == VType.ARRAY:
        if depth:
            c.fail(f"{key!r}: nested arrays are not supported")
        it = _vtype(c, c.u32(f"{key!r} item type"), f"{key!r} item type")
        n = c.u64(f"{key!r} item count")
        min_item = 8 if it == VType.STRING else struct.calcsize(SCALAR_FMT.get(it, "<B"))
        if it == VType.ARRAY or n * min_item > c.remaining():
            c.fail(f"{key!r}: array of {n} items of {it.name} does not fit in the file")
        if it == VType.STRING:
            start = c.pos
            fast = _string_array(c, n)
            if fast is not None:
                return fast, it
            c.pos = start  # something is wrong: the item-by-item reader names it
            return [c.string(f"item of {key!r}") for _ in range(n)], it
        fmt = SCALAR_FMT[it]
        raw = c.take(n * struct.calcsize(fmt), f"{key!r} items")
        return list(struct.unpack("<" + fmt[1] * n, raw)), it
    return c.unpack(SCALAR_FMT[vt], f"value of {key!r}")[0], None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise FormatError(path, f"cannot open: {e.strerror or e}") from None
    with f:
        if size < 24:
            raise FormatError(path, f"too small to be a GGUF file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(_Cursor(mm, size, path), path, size)


def _parse(c: _Cursor, path: Path, size: int) -> GGUFFile:
    if c.take(4, "magic") != MAGIC:
        raise FormatError(path, "not a GGUF file (bad magic)")
    version = c.u32("version")
    if version not in (2, 3):
        raise FormatError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
    # smallest possible entries: a kv is 8+0+4+1 bytes, a tensor info 8+0+4+8+4+8
    if n_kv * 13 > c.remaining() or n_tensors * 32 > c.remaining():
        raise FormatError(path, f"header claims {n_kv} metadata entries and {n_tensors} tensors; the file is too small")
    kv: dict[str, KV] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        if key in kv:
            c.fail(f"duplicate metadata key {key!r}")
        vt = _vtype(c, c.u32(f"{key!r} type"), f"{key!r}")
        value, item = _read_value(c, vt, key)
        kv[key] = KV(key, vt, value, item)
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        a = kv["general.alignment"]
        if a.vtype != VType.UINT32 or a.value == 0 or a.value & (a.value - 1):
            raise FormatError(path, f"general.alignment must be a power-of-two u32, got {a.value!r}")
        alignment = a.value
    raw_tensors = []
    names = set()
    for i in range(n_tensors):
        name = c.string(f"tensor name #{i}")
        if name in names:
            c.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        nd = c.u32(f"{name!r} n_dims")
        if not 1 <= nd <= MAX_DIMS:
            c.fail(f"tensor {name!r}: {nd} dimensions (1..{MAX_DIMS} allowed)")
        ne = c.unpack(f"<{nd}Q", f"{name!r} dims")
        raw_type = c.u32(f"{name!r} type")
        offset = c.u64(f"{name!r} offset")
        raw_tensors.append((name, ne, raw_type, offset))
    data_offset = c.pos + (alignment - c.pos % alignment) % alignment
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, ne, raw_type, offset in raw_tensors:
        try:
            qt = GGMLType(raw_type)
        except ValueError:
            raise FormatError(path, f"tensor {name!r}: unsupported ggml type {raw_type}") from None
        lay = LAYOUTS[qt]
        n = 1
        for d in ne:
            if d < 1 or d > size * lay.block_size:
                raise FormatError(path, f"tensor {name!r}: bad dimension {d}")
            n *= d
        if ne[0] % lay.block_size:
            raise FormatError(path, f"tensor {name!r}: row of {ne[0]} is not a multiple of {qt.name}'s block {lay.block_size}")
        nbytes = n // lay.block_size * lay.type_size
        if offset % alignment:
            raise FormatError(path, f"tensor {name!r}: offset {offset} is not aligned to {alignment}")
        start = data_offset + offset
        if nbytes > size or start > size - nbytes:
            raise FormatError(path, f"tensor {name!r}: data [{start}, {start + nbytes}) lies beyond the end of the file ({size} bytes)")
        spans.append((start, start + nbytes, name))
        tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(ne)), qt, start, nbytes)
    spans.sort()
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(path, f"tensors {n0!r} and {n1!r} overlap")
    return GGUFFile(path, version, kv, tensors, alignment, data_offset, size)
