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
from ..formats.checkpoint import all_finite
from .shards import INDEX_NAME, write_safetensors

STATE = "state.json"
SINGLE_FILE_BYTES = 2 * 2**30  # outputs below this end as one model.safetensors, as save_pretrained writes them


def shard_name(i: int, total: int) -> str:
    return f"model-{i + 1:05d}-of-{total:05d}.safetensors"


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


class ShardWriter:
    """Under ``torch.distributed`` every rank keeps its own activations for resume; rank 0 alone
    writes shards, state and the final directory (the ranks hold identical compressed blocks)."""

    def __init__(self, out_dir, total_shards: int, fingerprint: str, resume: bool):
        self.out = Path(out_dir)
        self.dir = Path(f"{self.out}.partial")
        self.total = total_shards
        self.fingerprint = fingerprint
        d = _dist()
        self.rank = d.get_rank() if d is not None else 0
        self.writes = self.rank == 0
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
        elif self.writes:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.writes:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(f"{self.dir}: cannot create: {e.strerror or e}") from None
        self._barrier()

    def _barrier(self) -> None:
        d = _dist()
        if d is not None:
            d.barrier()

    @property
    def done_blocks(self) -> int:
        return int(self.state["done_blocks"])

    @property
    def extra(self) -> dict:
        """Caller data kept with the state (the report's records so far)."""
        return self.state["extra"]

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
        name = shard_name(index, self.total)
        self.state["weight_map"].update({k: name for k in tensors})
        self.state["manifest"].update(manifest)
        self.state["tensor_bytes"] = self.state.get("tensor_bytes", 0) + sum(t.numel() * t.element_size()
                                                                             for t in tensors.values())
        if not self.writes:
            return
        tmp = self.dir / f".{name}.tmp"
        for key, t in tensors.items():  # no NaN is ever written: a non-finite float tensor is refused by name
            if not all_finite(t):
                from ..errors import NumericError

                raise NumericError(key, "holds NaN/Inf values; refusing to write the checkpoint")
        try:
            write_safetensors(tmp, tensors, {"format": "pt"})
            os.replace(tmp, self.dir / name)
        except OSError as e:
            from ..formats.atomic import write_error

            err = write_error(self.out, e)
            if err is not None:
                raise err from None
            raise

    def block_done(self, b: int, inputs=None) -> None:
        """Record block ``b`` finished (its shard written); ``inputs``: the activations entering ``b + 1``."""
        from safetensors.torch import save

        if inputs is not None:
            d = self.dir / f"inputs-{b}" / f"rank{self.rank}"
            d.mkdir(parents=True, exist_ok=True)
            n = 0
            for i, h in enumerate(inputs):
                atomic_write_bytes(d / f"h{i}.safetensors", save({"h": h.detach().contiguous().cpu()}))
                n = i + 1
            (d / "batches").write_text(str(n))
        self._barrier()  # every rank's activations are on disk before the state says the block is done
        self.state["done_blocks"] = b + 1
        if self.writes:
            self.save_state()
            shutil.rmtree(self.dir / f"inputs-{b - 1}", ignore_errors=True)
        self._barrier()

    def save_state(self) -> None:
        atomic_write_bytes(self.dir / STATE, json.dumps(self.state).encode())

    def saved_inputs(self):
        """The activations entering block ``done_blocks``, one batch at a time."""
        from safetensors.torch import load_file

        d = self.dir / f"inputs-{self.done_blocks - 1}" / f"rank{self.rank}"
        if not (d / "batches").is_file():
            raise InputError(f"--resume: {d} holds no activations of this rank (resume with the same number of processes)")
        for i in range(int((d / "batches").read_text())):
            yield load_file(str(d / f"h{i}.safetensors"))["h"]

    def finish(self, write_files) -> Path:
        """Write the index and ``write_files(directory)`` (config, tokenizer), then swap into ``out``."""
        from ..formats.atomic import publish_directory

        if not self.writes:
            self._barrier()
            return self.out
        total = sum((self.dir / f).stat().st_size for f in set(self.state["weight_map"].values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.state["weight_map"].items()))}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if total < SINGLE_FILE_BYTES:
            from .shards import merge_shards

            merge_shards(self.dir)
        write_files(self.dir)
        for p in list(self.dir.glob("inputs-*")):
            shutil.rmtree(p, ignore_errors=True)
        (self.dir / STATE).unlink(missing_ok=True)
        publish_directory(self.dir, self.out)
        self._barrier()
        return self.out

    def abort(self) -> None:
        """Remove the partial output (a run that failed on bad input leaves nothing behind)."""
        if self.writes:
            shutil.rmtree(self.dir, ignore_errors=True)
