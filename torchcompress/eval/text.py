"""Evaluation/calibration text: a user file, or Python's bundled documentation (``pydoc``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError

PYDOC = "pydoc"


def load_text(spec: str | Path) -> tuple[str, str]:
    """Return ``(text, description)`` for ``"pydoc"`` or a UTF-8 text file path."""
    if str(spec) == PYDOC:
        from pydoc_data.topics import topics

        # sorted keys: the same text on every run and Python build with the same topics
        return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics (Python's bundled documentation)"
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"{path}: text file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    if not text.strip():
        raise InputError(f"{path}: is empty")
    return text, str(path)
