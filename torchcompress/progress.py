"""Per-block progress with memory: a bar on a terminal, one line per block otherwise.

    bar = BlockProgress("compress", total=32, device=torch.device("cuda"))
    bar(b, n)   # after block b of n: elapsed, ETA, current / peak host RSS, peak CUDA memory
"""

from __future__ import annotations

import resource
import sys
import time

import torch


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_cuda_bytes(device) -> int | None:
    dev = torch.device(device)
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None


def memory_summary(device) -> dict:
    out = {"peak_rss_bytes": peak_rss_bytes()}
    cuda = peak_cuda_bytes(device)
    if cuda is not None:
        out["peak_cuda_bytes"] = cuda
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class BlockProgress:
    def __init__(self, what: str, device, stream=None):
        self.what = what
        self.device = torch.device(device)
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.first = None  # the first block this run did (a resumed run starts later)
        self.tty = self.stream.isatty()

    def __call__(self, b: int, n: int) -> None:
        now = time.perf_counter() - self.t0
        if self.first is None:
            self.first = b
        done = b + 1 - self.first
        eta = now / done * (n - b - 1) if done else 0.0
        line = (f"{self.what}: block {b + 1}/{n} {now:.0f}s elapsed, ETA {eta:.0f}s, RSS {_gib(rss_bytes())} "
                f"(peak {_gib(peak_rss_bytes())})")
        cuda = peak_cuda_bytes(self.device)
        if cuda is not None:
            line += f", CUDA peak {_gib(cuda)}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if b + 1 == n else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
