"""Peak host and device memory over stretches of code (a recipe stage), without resetting the
process's own counters (the run's peak in the report stays the whole run's).

    meter = PeakMemory(device)
    for block in blocks:
        with meter:            # a stage's work on one block
            ...
    meter.peak_rss_bytes, meter.peak_cuda_bytes   # the max over every ``with`` so far

How: if the process's peak (``ru_maxrss``; ``torch.cuda.max_memory_allocated``) rose during the
window, the window holds the process's new peak and that value is exact. Otherwise the window's
peak is below the process's earlier one, and a sampling thread (every ``interval`` seconds, plus the
window's two ends) gives it from below: a spike shorter than ``interval`` can be missed there.
"""

from __future__ import annotations

import threading

import torch

from ..progress import peak_rss_bytes, rss_bytes


def _cuda(device) -> torch.device | None:
    dev = torch.device(device) if device is not None else None
    return dev if dev is not None and dev.type == "cuda" and torch.cuda.is_available() else None


class PeakMemory:
    def __init__(self, device=None, interval: float = 0.02):
        self.cuda = _cuda(device)
        self.interval = interval
        self.peak_rss_bytes = 0
        self.peak_cuda_bytes: int | None = 0 if self.cuda is not None else None
        self._stop: threading.Event | None = None

    def _sample(self) -> None:
        self._rss = max(self._rss, rss_bytes())
        if self.cuda is not None:
            self._alloc = max(self._alloc, int(torch.cuda.memory_allocated(self.cuda)))

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._rss0, self._rss = peak_rss_bytes(), 0
        self._cuda0 = int(torch.cuda.max_memory_allocated(self.cuda)) if self.cuda is not None else 0
        self._alloc = 0
        self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(self._stop,), daemon=True, name="torchcompress-peak")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        rss1 = peak_rss_bytes()
        window = rss1 if rss1 > self._rss0 else self._rss  # a new process peak is exact; else sampled
        self.peak_rss_bytes = max(self.peak_rss_bytes, window)
        if self.cuda is not None:
            cuda1 = int(torch.cuda.max_memory_allocated(self.cuda))
            self.peak_cuda_bytes = max(self.peak_cuda_bytes, cuda1 if cuda1 > self._cuda0 else self._alloc)

    def merge(self, peak_rss: int | None = None, peak_cuda: int | None = None) -> None:
        """Fold in peaks measured earlier (a resumed run's finished blocks)."""
        self.peak_rss_bytes = max(self.peak_rss_bytes, int(peak_rss or 0))
        if self.peak_cuda_bytes is not None and peak_cuda is not None:
            self.peak_cuda_bytes = max(self.peak_cuda_bytes, int(peak_cuda))

    def as_dict(self) -> dict:
        d = {"peak_rss_bytes": self.peak_rss_bytes}
        if self.peak_cuda_bytes is not None:
            d["peak_cuda_bytes"] = self.peak_cuda_bytes
        return d
