"""Atomic writes: a killed process leaves the old output or none, never a torn file.

Files: temp file in the same directory, fsync, ``os.replace``. Directories: build a sibling temp
directory, fsync it, swap it in with renames (old output moved aside first and deleted last).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import InputError, WriteError

# errors of the disk, not of our code: reported as a typed WriteError (the old output is intact)
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}
_DISK_MESSAGES = re.compile(r"\(os error (\d+)\)")  # how Rust writers (safetensors) report an OS error


def _as_write_error(path: Path, e: BaseException) -> WriteError | None:
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        return WriteError(path, f"cannot write: {os.strerror(e.errno)}; nothing was replaced")
    m = _DISK_MESSAGES.search(str(e)) if type(e).__name__ == "SafetensorError" else None
    if m and int(m.group(1)) in _DISK_ERRNOS:
        return WriteError(path, f"cannot write: {os.strerror(int(m.group(1)))}; nothing was replaced")
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public_modes(root: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give outputs the modes a plain open()/mkdir would."""
    mask = _umask()
    paths = [root] + (list(root.rglob("*")) if root.is_dir() else [])
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _writable_parent(path: Path) -> Path:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{path}: cannot create output directory: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK):
        raise InputError(f"{path}: output directory {parent} is not writable")
    return parent


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator:
    """Yield a binary file to stream into; on success it replaces ``path`` whole (fsync + rename),
    on any exception the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    parent = _writable_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _public_modes(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        err = _as_write_error(path, e)
        if err is not None:
            raise err from None
        raise
    _fsync_dir(parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory to fill; on success it replaces ``path`` whole.

    >>> with atomic_directory("out/model") as tmp:
    ...     (tmp / "config.json").write_text("{}")
    """
    path = Path(path)
    parent = _writable_parent(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        publish_directory(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _as_write_error(path, e)
        if err is not None:
            raise err from None
        raise


def publish_directory(staging: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the filled directory ``staging`` (a sibling of ``path``) become ``path``: fsync every
    file, then swap it in with renames (the old ``path`` is moved aside first and deleted last)."""
    staging, path = Path(staging), Path(path)
    for f in staging.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(staging)
    _public_modes(staging)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.rmdir(old)
        os.rename(path, old)
    os.rename(staging, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def write_error(path: str | os.PathLike, e: BaseException) -> WriteError | None:
    """The typed :class:`WriteError` for a disk failure (full, file too large, read-only), else None."""
    return _as_write_error(Path(path), e)
