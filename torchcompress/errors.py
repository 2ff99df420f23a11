"""Typed errors. Every bad input raises one of these, with a message naming what is wrong.

The CLI maps :class:`InputError` (and its subclasses) to exit status 2 and prints the message
on one line; anything else is a bug or an environment failure (exit 1).
"""

from __future__ import annotations


class TorchCompressError(Exception):
    """Base class of every error torchcompress raises on purpose."""


class InputError(TorchCompressError, ValueError):
    """The caller gave something we cannot use (a value, a file, a recipe)."""


class ConfigError(InputError):
    """A config field has a bad value. ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class RecipeError(InputError):
    """A recipe is malformed. ``source`` and ``line`` point at the offending spot."""

    def __init__(self, message: str, source: str = "<recipe>", line: int | None = None):
        self.source = source
        self.line = line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


class NumericError(InputError):
    """A tensor holds values we refuse to quantize (NaN, Inf, empty). ``tensor`` names it."""

    def __init__(self, tensor: str, message: str):
        self.tensor = tensor
        super().__init__(f"tensor {tensor!r}: {message}")


class FormatError(InputError):
    """A file on disk is not what it claims to be (truncated, wrong version, hostile)."""

    def __init__(self, path: str, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class WriteError(InputError):
    """An output could not be written (disk full, file too large, read-only, permission); the previous
    output, if any, is intact (writes are atomic). ``path`` names the output."""

    def __init__(self, path: str, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class UnsupportedLayerError(InputError):
    """A layer's compression scheme has no representation in the requested output format (e.g. NVFP4
    or 3-bit groups in ONNX ``MatMulNBits``). ``layer`` names it, ``reason`` says why."""

    def __init__(self, layer: str, fmt: str, reason: str):
        self.layer = layer
        self.reason = reason
        super().__init__(f"{layer}: cannot be written as {fmt}: {reason}")
