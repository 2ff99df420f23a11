"""The GGUF container (version 3): metadata key/values, tensor table, aligned tensor data.

Layout (little-endian)::

    "GGUF" | version:u32 | n_tensors:u64 | n_kv:u64
    n_kv x  (key:str, type:u32, value)          str = len:u64 + UTF-8 bytes; arrays = type:u32, n:u64, items
    n_tensors x (name:str, n_dims:u32, ne:u64[n_dims], type:u32, offset:u64)   ne[0] = innermost dim
    padding to `general.alignment` (default 32), then tensor data, each tensor at an aligned offset

:func:`write_gguf` streams: the table is computed from shapes and types first, then each tensor's
bytes are produced, written and dropped, into a temp file that is fsynced and renamed into place.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..primitives.gguf_common import LAYOUTS, GGMLType

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32


class VType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


SCALAR_FMT = {
    VType.UINT8: "<B", VType.INT8: "<b", VType.UINT16: "<H", VType.INT16: "<h", VType.UINT32: "<I",
    VType.INT32: "<i", VType.FLOAT32: "<f", VType.BOOL: "<?", VType.UINT64: "<Q", VType.INT64: "<q",
    VType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class KV:
    key: str
    vtype: VType
    value: object
    item_type: VType | None = None  # for arrays


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first)
    qtype: GGMLType

    @property
    def nbytes(self) -> int:
        lay = LAYOUTS[self.qtype]
        n = 1
        for s in self.shape:
            n *= s
        return n // lay.block_size * lay.type_size


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: VType, value, item_type: VType | None) -> bytes:
    if vtype == VType.STRING:
        return _str(value)
    if vtype == VType.ARRAY:
        assert item_type is not None
        items = list(value)
        head = struct.pack("<IQ", int(item_type), len(items))
        if item_type == VType.STRING:
            return head + b"".join(_str(s) for s in items)
        return head + struct.pack("<" + SCALAR_FMT[item_type][1] * len(items), *items)
    return struct.pack(SCALAR_FMT[vtype], value)


def _pad(n: int, align: int) -> int:
    return (align - n % align) % align


def encode_header(kvs: Iterable[KV], tensors: list[TensorPlan], alignment: int) -> tuple[bytes, list[int]]:
    """Header bytes (padded to ``alignment``) and each tensor's offset inside the data section."""
    kvs = list(kvs)
    out = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(kvs))]
    for kv in kvs:
        out.append(_str(kv.key) + struct.pack("<I", int(kv.vtype)) + _value(kv.vtype, kv.value, kv.item_type))
    offsets, off = [], 0
    for t in tensors:
        ne = tuple(reversed(t.shape))
        out.append(_str(t.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, int(t.qtype), off))
        offsets.append(off)
        off += t.nbytes + _pad(t.nbytes, alignment)
    head = b"".join(out)
    return head + b"\0" * _pad(len(head), alignment), offsets


def write_gguf(
    path: str | os.PathLike,
    kvs: Iterable[KV],
    tensors: list[TensorPlan],
    produce: Callable[[TensorPlan], torch.Tensor],
    alignment: int = DEFAULT_ALIGNMENT,
) -> int:
    """Write a .gguf atomically; ``produce(plan)`` returns that tensor's bytes (a uint8 tensor, or an
    iterable of them written in order).

    Returns the file size. A failure (or Ctrl-C) leaves the previous file, or none.
    """
    from .atomic import atomic_file

    header, _ = encode_header(kvs, tensors, alignment)
    with atomic_file(path) as f:
        f.write(header)
        for t in tensors:
            out = produce(t)  # one tensor, or an iterable of row chunks (big tensors: bounded memory)
            written = 0
            for part in ([out] if torch.is_tensor(out) else out):
                data = part.contiguous().view(torch.uint8).reshape(-1)
                f.write(memoryview(data.numpy()))
                written += data.numel()
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: produced {written} bytes, expected {t.nbytes}")
            f.write(b"\0" * _pad(t.nbytes, alignment))
        size = f.tell()
    return size
