"""Where layer-by-layer runners keep the current block's activations between passes.

A decoder block's inputs for N calibration samples take ``N x L x D x 4`` bytes (128 x 2048 x 4096
floats is 4 GiB): with ``offload_dir`` they live on disk, one safetensors file per batch, and only
the batch being run is in memory. Without it they stay in CPU memory (the default: fastest).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import InputError


class ActivationStore:
    """A list of per-batch tensors, in memory or on disk (``directory``); same interface either way.

    ``store[i]`` returns the tensor (read from disk when offloaded), ``store[i] = t`` replaces it,
    ``store.append(t)``, ``len(store)``. ``close()`` removes the files (also on garbage collection).
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self._mem: list[torch.Tensor] | None = [] if directory is None else None
        self._n = 0
        self._dir = None
        if directory is not None:
            root = Path(directory)
            try:
                root.mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix="activations-", dir=root))
            except OSError as e:
                raise InputError(f"{root}: cannot hold offloaded activations: {e.strerror or e}") from None

    @property
    def on_disk(self) -> bool:
        return self._dir is not None

    def _path(self, i: int) -> Path:
        return self._dir / f"b{i}.safetensors"

    def __len__(self) -> int:
        return self._n

    def _check(self, i: int) -> int:
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return i % self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        i = self._check(i)
        if self._mem is not None:
            return self._mem[i]
        from safetensors.torch import load_file

        return load_file(str(self._path(i)))["h"]

    def _write(self, i: int, t: torch.Tensor) -> None:
        from safetensors.torch import save_file

        tmp = self._dir / f".b{i}.tmp"
        try:
            save_file({"h": t.detach().contiguous().cpu()}, str(tmp))
            os.replace(tmp, self._path(i))
        except OSError as e:
            raise InputError(f"{self._dir}: cannot write offloaded activations: {e.strerror or e}") from None

    def __setitem__(self, i: int, t: torch.Tensor) -> None:
        i = self._check(i)
        if self._mem is not None:
            self._mem[i] = t
        else:
            self._write(i, t)

    def append(self, t: torch.Tensor) -> None:
        if self._mem is not None:
            self._mem.append(t)
        else:
            self._write(self._n, t)
        self._n += 1

    def __iter__(self):
        for i in range(self._n):
            yield self[i]

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._mem, self._n = ([] if self._mem is not None else None), 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to clean reliably
            pass


def store_from(tensors, directory=None) -> ActivationStore:
    """An :class:`ActivationStore` holding ``tensors`` (an iterable of per-batch tensors)."""
    s = ActivationStore(directory)
    for t in tensors:
        s.append(t)
    return s
