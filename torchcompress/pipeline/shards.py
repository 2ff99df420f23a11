"""Read and write safetensors checkpoints one tensor at a time, without mmap.

Why not ``safe_open``: a mapped 5 GB shard puts every page it touches into the process's resident
set, and a shard truncated in its data area maps fine and then kills the process with SIGBUS on
read. Here every header is checked against the file size when the checkpoint is opened, tensors are
read with ``readinto`` into their own buffer, and written straight from the tensor's memory.

Example::

    ckpt = Checkpoint.open("path/to/model")          # model.safetensors[.index.json], checked
    w = ckpt.get("model.layers.0.mlp.up_proj.weight", dtype=torch.float32)
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, every offset checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(path, "truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise FormatError(path, f"truncated or corrupt safetensors file (header of {n} bytes in a file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(path, f"corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(path, "corrupt safetensors header: not a JSON object")
    base, out, end = 8 + n, {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            a, b = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(path, f"tensor {name!r}: bad header entry ({e!r})") from None
        numel = 1
        for d in shape:
            if d < 0:
                raise FormatError(path, f"tensor {name!r}: negative dimension")
            numel *= d
        nbytes = numel * dtype.itemsize
        if not 0 <= a <= b or b - a != nbytes:
            raise FormatError(path, f"tensor {name!r}: data offsets {a}..{b} do not match shape {shape} {dtype}")
        if base + b > size:
            raise FormatError(path, f"truncated: tensor {name!r} ends at byte {base + b} of a {size}-byte file")
        end = max(end, b)
        out[name] = TensorInfo(path, dtype, shape, base + a, nbytes)
    return out


class Checkpoint:
    """The tensors of a Hugging Face model directory (sharded or not), read one at a time."""

    def __init__(self, directory: Path, tensors: dict[str, TensorInfo], config: dict):
        self.dir = directory
        self.tensors = tensors
        self.config = config

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Checkpoint":
        d = Path(directory)
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"{d}: no config.json (not a transformers model directory)")
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(cfg_path, f"not readable JSON: {e}") from None
        index = d / INDEX_NAME
        tensors: dict[str, TensorInfo] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise FormatError(index, f"not a safetensors index: {e!r}") from None
            for name in files:
                if "/" in name or "\\" in name or name.startswith("."):
                    raise FormatError(index, f"shard name {name!r} leaves the model directory")
                shard = d / name
                if not shard.is_file():
                    raise FormatError(shard, f"missing shard (named by {INDEX_NAME})")
                found = read_header(shard)
                for t in [t for t, f in weight_map.items() if f == name]:
                    if t not in found:
                        raise FormatError(shard, f"lacks tensor {t!r}, which {INDEX_NAME} says it holds")
                    tensors[t] = found[t]
        elif (d / SINGLE_NAME).is_file():
            tensors = read_header(d / SINGLE_NAME)
        else:
            raise InputError(f"{d}: no {SINGLE_NAME} or {INDEX_NAME} (weights must be safetensors)")
        from ..formats.ct_convert import CTCheckpoint, is_ct_config

        if is_ct_config(config):  # compressed-tensors: seen under our module and tensor names
            return CTCheckpoint(cls(d, tensors, config))
        return cls(d, tensors, config)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The checkpoint's own dtype (config ``torch_dtype`` / ``dtype``), if it names one."""
        name = self.config.get("torch_dtype") or self.config.get("dtype")
        return getattr(torch, name, None) if isinstance(name, str) else None

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def get(self, name: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise FormatError(self.dir, f"no tensor {name!r} in the checkpoint")
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            with open(info.file, "rb") as f:
                f.seek(info.start)
                got = f.readinto(memoryview(buf.numpy()))
            if got != info.nbytes:
                raise FormatError(info.file, f"truncated while reading tensor {name!r}")
        t = buf.view(info.dtype).reshape(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device) if str(device) != "cpu" else t


def merge_shards(directory: Path, index_name: str = INDEX_NAME, out_name: str = SINGLE_NAME) -> Path:
    """Join the shards named by ``directory/index_name`` into one ``out_name`` (bytes copied file to
    file, never a whole tensor in memory); the shards and the index are removed after."""
    weight_map = json.loads((directory / index_name).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    infos = {}
    for f in files:
        infos.update(read_header(directory / f))
    header, offset = {}, 0
    names = sorted(infos)
    for name in names:
        i = infos[name]
        header[name] = {"dtype": CODES[i.dtype], "shape": list(i.shape), "data_offsets": [offset, offset + i.nbytes]}
        offset += i.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = directory / f".{out_name}.tmp"
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name in names:
            i = infos[name]
            with open(i.file, "rb") as src:
                src.seek(i.start)
                left = i.nbytes
                while left:
                    chunk = src.read(min(left, 64 * 2**20))
                    if not chunk:
                        raise FormatError(i.file, f"truncated while copying tensor {name!r}")
                    out.write(chunk)
                    left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, directory / out_name)
    for f in files:
        (directory / f).unlink()
    (directory / index_name).unlink()
    return directory / out_name


def _tensor_bytes_view(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> int:
    """Write ``tensors`` to ``path`` (a plain file; callers make it atomic); returns its size."""
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in CODES:
            raise FormatError(path, f"tensor {name!r}: dtype {t.dtype} has no safetensors code")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned, as safetensors writes them
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(_tensor_bytes_view(t))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


class LazyWeights:
    """``{model tensor name: tensor}`` read from a checkpoint on access, never all at once."""

    def __init__(self, model, ckpt: Checkpoint, dtype: torch.dtype | None = None):
        self.model, self.ckpt, self.dtype = model, ckpt, dtype

    def _key(self, name: str) -> str | None:
        from .skeleton import checkpoint_key

        try:
            return checkpoint_key(self.model, self.ckpt, name)
        except FormatError:
            return None

    def __contains__(self, name: str) -> bool:
        return self._key(name) is not None

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._key(name)
        if key is None:
            raise KeyError(name)
        return self.ckpt.get(key, dtype=self.dtype)
