"""Per-block state of a layer-by-layer run, written atomically, so a killed run resumes where it stopped.

``<state_dir>/state.json`` names the run's fingerprint (model, calibration data, config, targets)
and the number of finished blocks; ``block-<b>.safetensors`` holds block ``b``'s quantized tensors
(with a manifest of its compressed modules in the metadata) and ``inputs-<b>/h<i>.safetensors``
the hidden states (one file per batch) that enter block ``b + 1``. ``state.json`` is replaced last, so after a kill it
always points at files that were completely written. A state whose fingerprint differs is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import InputError

STATE = "state.json"


def run_fingerprint(model: nn.Module, calib, cfg, targets, ignore) -> str:
    from .selfgen import model_fingerprint

    h = hashlib.sha256()
    for part in (model_fingerprint(model), calib.sha256(), repr(cfg), repr(tuple(targets)), repr(ignore)):
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()


class BlockState:
    def __init__(self, state_dir, fingerprint: str):
        self.dir = Path(state_dir)
        self.fingerprint = fingerprint
        self.done = 0
        path = self.dir / STATE
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"{path}: unreadable resume state ({e}); delete {self.dir} to start over") from None
            if data.get("fingerprint") != fingerprint:
                raise InputError(f"{self.dir}: the saved state was made from a different model, calibration data or "
                                 "config; refusing to resume (delete it to start over)")
            self.done = int(data["done_blocks"])

    def save_block(self, b: int, modules: dict[str, nn.Module], hidden: list[torch.Tensor]) -> None:
        """Record block ``b`` as finished: its compressed modules and the next block's inputs."""
        from safetensors.torch import save

        from ..formats.atomic import atomic_write_bytes
        from ..formats.checkpoint import MODULE_KINDS

        manifest, tensors = {}, {}
        for name, m in modules.items():
            kind = next(k for k, (cls, _, _) in MODULE_KINDS.items() if type(m) is cls)
            manifest[name] = MODULE_KINDS[kind][1](m)
            for key, t in m.state_dict().items():
                tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
        atomic_write_bytes(self.dir / f"block-{b}.safetensors", save(tensors, metadata={"manifest": json.dumps(manifest)}))
        inputs = self.dir / f"inputs-{b}"  # one file per batch: an offloaded store is never gathered in memory
        inputs.mkdir(parents=True, exist_ok=True)
        n = 0
        for i, h in enumerate(hidden):
            atomic_write_bytes(inputs / f"h{i}.safetensors", save({"h": h.detach().contiguous().cpu()}))
            n = i + 1
        atomic_write_bytes(self.dir / STATE, json.dumps({"fingerprint": self.fingerprint, "done_blocks": b + 1,
                                                         "batches": n}).encode())
        import shutil

        shutil.rmtree(self.dir / f"inputs-{b - 1}", ignore_errors=True)
        self.done = b + 1

    def load_block(self, b: int) -> dict[str, nn.Module]:
        """The compressed modules of finished block ``b`` (name within the block -> module)."""
        from safetensors import safe_open

        from ..formats.checkpoint import MODULE_KINDS

        path = self.dir / f"block-{b}.safetensors"
        with safe_open(str(path), "pt") as f:
            manifest = json.loads(f.metadata()["manifest"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        out = {}
        for name, entry in manifest.items():
            m = MODULE_KINDS[entry["type"]][2](entry, device="meta")
            sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            m.load_state_dict(sd, strict=True, assign=True)
            out[name] = m.eval()
        return out

    def load_inputs(self):
        """The saved activations entering block ``done``, one batch at a time (a generator)."""
        from safetensors.torch import load_file

        d = self.dir / f"inputs-{self.done - 1}"
        n = len(list(d.glob("h*.safetensors")))
        for i in range(n):
            yield load_file(str(d / f"h{i}.safetensors"))["h"]
