"""Calibration sources -> lists of token-id documents.

A source spec is one string:

* ``pydoc``: Python's bundled documentation, one document per topic;
* ``self``: text sampled from the model itself (data-free; see :mod:`.selfgen`);
* ``hf:NAME[:SPLIT[:COLUMN]]``: a Hugging Face dataset (from the local cache when offline);
* a ``.jsonl`` file of chat conversations (``{"messages": [{"role", "content"}, ...]}`` per line),
  rendered with the tokenizer's chat template (transformers renders it in a sandboxed Jinja
  environment; nothing is executed);
* a ``.safetensors`` file of pre-tokenized ids (``input_ids`` (N, L), optional ``attention_mask``);
* any other path or glob: UTF-8 text files, one document per file.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path

import torch

from ..errors import InputError


class CalibrationDataError(InputError):
    """A calibration source cannot be used. ``source`` names it."""

    def __init__(self, source: str, message: str):
        self.source = source
        super().__init__(f"calibration source {source!r}: {message}")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _text_docs(spec: str, tokenizer) -> tuple[list[list[int]], str]:
    if any(c in spec for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise CalibrationDataError(spec, "the glob matches no file")
    else:
        paths = [Path(spec)]
        if not paths[0].is_file():
            raise CalibrationDataError(spec, "no such file (give a file, a glob, 'pydoc', 'self' or hf:NAME)")
    docs = []
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CalibrationDataError(str(p), f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise CalibrationDataError(str(p), f"cannot read: {e.strerror or e}") from None
        if text.strip():
            docs.append(_encode(tokenizer, text))
    return docs, f"{len(paths)} text file(s) {spec}"


def _pydoc_docs(tokenizer) -> tuple[list[list[int]], str]:
    from pydoc_data.topics import topics

    return [_encode(tokenizer, topics[k]) for k in sorted(topics)], "pydoc_data.topics"


def _chat_docs(path: Path, tokenizer) -> tuple[list[list[int]], str]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise CalibrationDataError(str(path), "the tokenizer has no chat template to render conversations with")
    docs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationDataError(str(path), f"cannot read: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{path}:{n}", f"not JSON: {e.msg}") from None
        msgs = row.get("messages") if isinstance(row, dict) else row
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        if not ok:
            raise CalibrationDataError(f"{path}:{n}", "expected {\"messages\": [{\"role\": str, \"content\": str}, ...]}")
        # apply_chat_template renders in transformers' ImmutableSandboxedEnvironment; a template that
        # reaches for Python internals (SecurityError) or raises is the tokenizer's fault: a typed error
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False)
        except TemplateError as e:
            raise CalibrationDataError(f"{path}:{n}", f"the tokenizer's chat template failed: {type(e).__name__}: {e}") from None
        docs.append(_encode(tokenizer, text))
    if not docs:
        raise CalibrationDataError(str(path), "holds no conversation")
    return docs, f"chat conversations {path} ({len(docs)})"


def _tensor_docs(path: Path) -> tuple[list[list[int]], str]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CalibrationDataError(str(path), f"unreadable safetensors: {e}") from None
    ids = sd.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise CalibrationDataError(str(path), "needs an integer tensor 'input_ids' of shape (N, L)")
    mask = sd.get("attention_mask")
    if mask is not None and mask.shape != ids.shape:
        raise CalibrationDataError(str(path), f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    docs = []
    for i in range(ids.shape[0]):
        row = ids[i] if mask is None else ids[i][mask[i].bool()]
        if row.numel():
            docs.append(row.tolist())
    return docs, f"pre-tokenized {path} ({ids.shape[0]} x {ids.shape[1]})"


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_hf_spec(spec: str) -> tuple[str, str, str]:
    """``(name, split, column)`` of ``hf:NAME[:SPLIT[:COLUMN]]``; fails fast (before any model loads)
    on a malformed spec or a missing ``datasets`` package."""
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise CalibrationDataError(spec, "expected hf:NAME[:SPLIT[:COLUMN]]")
    if importlib.util.find_spec("datasets") is None:
        why = " (and HF_HUB_OFFLINE is set, so it could not download anyway)" if _offline() else ""
        raise CalibrationDataError(spec, f"needs the 'datasets' package: pip install datasets{why}")
    return parts[0], (parts[1:2] or ["train"])[0] or "train", (parts[2:3] or ["text"])[0] or "text"


def _hf_docs(spec: str, tokenizer) -> tuple[list[list[int]], str]:
    name, split, column = check_hf_spec(spec)
    import datasets
    try:
        # offline: datasets reads only its local cache and fails at once if the set is not there
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many unrelated types for "not available"
        where = "not in the local cache and HF_HUB_OFFLINE is set" if _offline() else "cannot be loaded"
        raise CalibrationDataError(spec, f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if column not in ds.column_names:
        raise CalibrationDataError(spec, f"no column {column!r} (columns: {', '.join(ds.column_names)})")
    docs = [_encode(tokenizer, t) for t in ds[column] if isinstance(t, str) and t.strip()]
    return docs, f"hf dataset {name} split {split} column {column}"


def load_documents(spec: str, tokenizer, *, model=None, selfgen=None) -> tuple[list[list[int]], str]:
    """Token-id documents and a one-line description for one source ``spec`` (see module doc)."""
    spec = str(spec)
    if spec == "pydoc":
        return _pydoc_docs(tokenizer)
    if spec == "self":
        from .selfgen import SelfGenConfig, sample_documents

        if model is None:
            raise CalibrationDataError(spec, "model-sampled calibration needs the model")
        return sample_documents(model, tokenizer, selfgen or SelfGenConfig())
    if spec.startswith("hf:"):
        return _hf_docs(spec, tokenizer)
    p = Path(spec)
    if p.suffix == ".jsonl" and p.is_file():
        return _chat_docs(p, tokenizer)
    if p.suffix == ".safetensors" and p.is_file():
        return _tensor_docs(p)
    return _text_docs(spec, tokenizer)


def as_long(docs: list[list[int]]) -> list[torch.Tensor]:
    return [torch.tensor(d, dtype=torch.long) for d in docs if len(d)]
