"""Peak memory of a block of work: process RSS sampled in a thread (CPU), or CUDA's allocator peak."""

from __future__ import annotations

import threading

import torch

from benchmarks.rss import current_rss_bytes, peak_rss_bytes

SAMPLE_SECONDS = 0.005


def current_rss() -> int:
    """Resident set size of this process in bytes (where ``/proc`` is unavailable: the peak so far)."""
    rss = current_rss_bytes()
    return rss if rss is not None else peak_rss_bytes()


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak``: the highest process RSS seen while the block ran
    (sampled every 5 ms; models already loaded count), or on CUDA the allocator's peak during the block."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, current_rss())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = int(torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, current_rss())
