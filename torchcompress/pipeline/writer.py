"""Sharded safetensors output written block by block, with the state a killed run resumes from.

Everything goes to ``<out>.partial/`` first: one shard per decoder block and one per module outside
the blocks (``model-00003-of-00034.safetensors``), each written to a temp file and renamed, then
``state.json`` (replaced last) records the finished blocks. :meth:`ShardWriter.finish` adds the
index, config and tokenizer and swaps the directory into place, so ``<out>`` is the old output or
the complete new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import InputError
from ..formats.atomic import atomic_write_bytes
from .shards import INDEX_NAME, write_safetensors

STATE = "state.json"


def shard_name(i: int, total: int) -> str:
    return f"model-{i + 1:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    def __init__(self, out_dir, total_shards: int, fingerprint: str, resume: bool):
        self.out = Path(out_dir)
        self.dir = Path(f"{self.out}.partial")
        self.total = total_shards
        self.fingerprint = fingerprint
        self.state = {"fingerprint": fingerprint, "done_blocks": 0, "weight_map": {}, "manifest": {}, "tied": {},
                      "extra": {}}
        path = self.dir / STATE
        if resume and path.is_file():
            try:
                state = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"{path}: unreadable resume state ({e}); remove --resume to start over") from None
            if state.get("fingerprint") != fingerprint:
                raise InputError(f"--resume: {self.dir} was made from a different model, recipe, data or settings; "
                                 "refusing to resume (remove --resume to start over)")
            self.state = state
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{self.dir}: cannot create: {e.strerror or e}") from None

    @property
    def done_blocks(self) -> int:
        return int(self.state["done_blocks"])

    @property
    def extra(self) -> dict:
        """Caller data kept with the state (the report's records so far)."""
        return self.state["extra"]

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
        name = shard_name(index, self.total)
        tmp = self.dir / f".{name}.tmp"
        for key, t in tensors.items():  # no NaN is ever written: a non-finite float tensor is refused by name
            if t.is_floating_point() and not bool(t.isfinite().all()):
                from ..errors import NumericError

                raise NumericError(key, "holds NaN/Inf values; refusing to write the checkpoint")
        write_safetensors(tmp, tensors, {"format": "pt"})
        os.replace(tmp, self.dir / name)
        self.state["weight_map"].update({k: name for k in tensors})
        self.state["tensor_bytes"] = self.state.get("tensor_bytes", 0) + sum(t.numel() * t.element_size()
                                                                             for t in tensors.values())
        self.state["manifest"].update(manifest)

    def block_done(self, b: int, inputs=None) -> None:
        """Record block ``b`` finished (its shard written); ``inputs``: the activations entering ``b + 1``."""
        from safetensors.torch import save

        if inputs is not None:
            d = self.dir / f"inputs-{b}"
            d.mkdir(exist_ok=True)
            n = 0
            for i, h in enumerate(inputs):
                atomic_write_bytes(d / f"h{i}.safetensors", save({"h": h.detach().contiguous().cpu()}))
                n = i + 1
            self.state["batches"] = n
        self.state["done_blocks"] = b + 1
        self.save_state()
        shutil.rmtree(self.dir / f"inputs-{b - 1}", ignore_errors=True)

    def save_state(self) -> None:
        atomic_write_bytes(self.dir / STATE, json.dumps(self.state).encode())

    def saved_inputs(self):
        """The activations entering block ``done_blocks``, one batch at a time."""
        from safetensors.torch import load_file

        d = self.dir / f"inputs-{self.done_blocks - 1}"
        for i in range(int(self.state.get("batches", 0))):
            yield load_file(str(d / f"h{i}.safetensors"))["h"]

    def finish(self, write_files) -> Path:
        """Write the index and ``write_files(directory)`` (config, tokenizer), then swap into ``out``."""
        from ..formats.atomic import publish_directory

        total = sum((self.dir / f).stat().st_size for f in set(self.state["weight_map"].values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.state["weight_map"].items()))}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        write_files(self.dir)
        for p in list(self.dir.glob("inputs-*")):
            shutil.rmtree(p, ignore_errors=True)
        (self.dir / STATE).unlink(missing_ok=True)
        publish_directory(self.dir, self.out)
        return self.out

    def abort(self) -> None:
        """Remove the partial output (a run that failed on bad input leaves nothing behind)."""
        shutil.rmtree(self.dir, ignore_errors=True)
