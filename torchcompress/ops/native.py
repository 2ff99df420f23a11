"""The optional native CPU extension ``torchcompress._C`` (sources in the top-level ``kernels/cpu/``).

Found in this order:

1. an installed ``torchcompress._C`` (``TORCHCOMPRESS_BUILD_EXT=1 pip install --no-build-isolation .``);
2. built at first use with ``torch.utils.cpp_extension.load`` into
   ``cache_dir()/ext/<name>`` where the name carries a hash of the sources, the torch and Python
   versions and the compiler flags, so a change of any of them builds afresh and an unchanged
   one loads in milliseconds.

Without a compiler (or ninja, or the sources) :func:`load_native` returns ``None`` after one
warning saying why, and the pure-PyTorch reference runs.

Example::

    from torchcompress.ops.native import load_native
    ext = load_native()
    if ext is not None:
        print(ext.available_isas())  # e.g. ['avx512', 'avx2', 'portable']
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parents[2] / "kernels" / "cpu"
CFLAGS = ("-O3", "-std=c++17", "-fopenmp")  # OpenMP: at::parallel_for's threads (libgomp, as torch)
LDFLAGS = ("-fopenmp",)


class NativeUnavailable(RuntimeError):
    """Why the extension cannot be built or loaded here."""


def _sources() -> list[Path]:
    if not SOURCE_DIR.is_dir():
        raise NativeUnavailable(f"kernel sources not found at {SOURCE_DIR} (an installed copy without kernels/)")
    cpp = sorted(SOURCE_DIR.glob("*.cpp"))
    if not cpp:
        raise NativeUnavailable(f"no *.cpp kernel sources in {SOURCE_DIR}")
    return cpp


def build_key() -> str:
    """Hash of everything the binary depends on: sources, torch and Python versions, flags, and where
    the sources are (torch's build files name the source paths: two checkouts sharing one build
    directory would rebuild it for each other on every load)."""
    import torch

    h = hashlib.sha256(str(SOURCE_DIR.resolve()).encode())
    for path in sorted(SOURCE_DIR.glob("*.cpp")) + sorted(SOURCE_DIR.glob("*.h")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{CFLAGS}|{LDFLAGS}".encode())
    return h.hexdigest()[:16]


def _check_toolchain() -> None:
    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise NativeUnavailable(f"no C++ compiler: {cxx!r} is not on PATH (set CXX or install g++)")
    if not is_ninja_available():
        raise NativeUnavailable("ninja is not installed (pip install ninja)")


def build(verbose: bool = False):
    """Build (or load the cached build of) the extension; raises :class:`NativeUnavailable`."""
    from ..models import cache_dir

    sources = _sources()
    _check_toolchain()
    name = f"torchcompress_C_{build_key()}"
    build_dir = cache_dir() / "ext" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load

    with _build_lock(build_dir):
        try:
            return load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(build_dir),
                verbose=verbose,
            )
        except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError with the log
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NativeUnavailable(f"building the extension in {build_dir} failed: {first}") from e


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """One build per directory at a time, without torch's stale-lock hang.

    torch's ``load`` guards a build with a ``lock`` file that it removes when done; a build killed
    midway leaves it behind and every later ``load`` waits for it forever. Ours is an advisory
    ``flock`` that the kernel releases when its holder dies: while we hold it no other process of
    ours is building here, so a ``lock`` file found then is stale and is removed.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock only
        yield
        return
    with open(build_dir / ".build.flock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # waits only for a live builder
        try:
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("removing a stale build lock left by a killed build: %s", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def load_native():
    """The extension module, or ``None`` after one warning (per process) saying why.

    Thread-safe: threads racing on the first call wait for one build/import and share its result.
    """
    with _LOAD_LOCK:
        return _load_once()


@functools.lru_cache(maxsize=None)
def _load_once():
    try:
        from .. import _C  # type: ignore[attr-defined]  # built at install time

        return _C
    except ImportError:
        pass
    try:
        mod = build()
    except NativeUnavailable as e:
        warnings.warn(f"torchcompress: native CPU kernels unavailable, using the PyTorch reference: {e}", stacklevel=2)
        return None
    log.info("native CPU kernels loaded from %s (%s)", mod.__file__, ", ".join(mod.available_isas()))
    return mod
