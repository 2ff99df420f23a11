"""``torchcompress info PATH``: what a compressed directory, model directory or .gguf file holds.

Reads headers only (safetensors metadata, GGUF tensor infos); no weights are loaded.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .errors import FormatError, InputError


def _safetensors_summary(path: Path) -> tuple[int, int, Counter]:
    from safetensors import SafetensorError, safe_open

    n_tensors = n_elems = 0
    dtypes: Counter = Counter()
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                numel = 1
                for s in sl.get_shape():
                    numel *= s
                n_tensors += 1
                n_elems += numel
                dtypes[sl.get_dtype()] += numel
    except (SafetensorError, OSError) as e:
        raise FormatError(path, f"unreadable safetensors: {e}") from None
    return n_tensors, n_elems, dtypes


def _describe_dir(path: Path) -> str:
    from .eval.size import dir_bytes
    from .formats.checkpoint import read_manifest

    lines = [f"{path}: {dir_bytes(path):,} bytes on disk"]
    cfg_path = path / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FormatError(cfg_path, f"not readable JSON: {e}") from None
        arch = ",".join(cfg.get("architectures") or []) or cfg.get("model_type", "?")
        lines.append(f"  model: {arch}, hidden {cfg.get('hidden_size')}, layers {cfg.get('num_hidden_layers')}, "
                     f"vocab {cfg.get('vocab_size')}")
    manifest = read_manifest(path)
    if manifest is not None:
        mods = manifest["modules"]
        schemes = Counter()
        for name, entry in mods.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("scheme", {}), dict):
                raise FormatError(path, f"manifest entry of module {name!r} is not a mapping")
            s = entry.get("scheme", {})
            gran = s.get("granularity")
            g = f"g{s.get('group_size')}" if gran == "group" else gran
            schemes[f"{entry.get('type')} w{s.get('bits')} {g} {'sym' if s.get('symmetric') else 'asym'} "
                    f"scale {s.get('scale_dtype')}"] += 1
        lines.append(f"  torchcompress checkpoint v{manifest['format_version']}: {len(mods)} compressed modules")
        lines += [f"    {n:4d} x {k}" for k, n in sorted(schemes.items())]
        if manifest.get("tied"):
            lines.append(f"  tied tensors: {', '.join(f'{k} -> {v}' for k, v in manifest['tied'].items())}")
    weights = sorted(path.glob("*.safetensors"))
    for w in weights:
        n, elems, dtypes = _safetensors_summary(w)
        dt = ", ".join(f"{k} {v:,}" for k, v in dtypes.most_common())
        lines.append(f"  {w.name}: {n} tensors, {elems:,} elements ({dt})")
    if manifest is None and not weights and not cfg_path.is_file():
        raise InputError(f"{path}: neither a model directory nor a torchcompress output")
    return "\n".join(lines)


def _describe_gguf(path: Path) -> str:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as e:  # gguf-py raises many kinds on malformed files; all mean "bad file"
        raise FormatError(path, f"not a readable GGUF file: {type(e).__name__}: {e}") from None
    arch_field = reader.fields.get("general.architecture")
    arch = "?"
    if arch_field is not None:
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", "replace")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    lines = [f"{path}: GGUF, {path.stat().st_size:,} bytes, architecture {arch}, {len(reader.tensors)} tensors, "
             f"{len(reader.fields)} metadata keys"]
    lines += [f"    {n:4d} x {k}" for k, n in types.most_common()]
    return "\n".join(lines)


def describe(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_dir():
        return _describe_dir(p)
    if p.suffix.lower() == ".gguf":
        return _describe_gguf(p)
    raise InputError(f"{p}: give a directory or a .gguf file")
