"""Peak memory of a block of work: sampled process RSS on CPU, `max_memory_allocated` on CUDA.

`ru_maxrss` is a process-lifetime high-water mark, so in a multirun (several jobs in one process) it would
charge every job with the largest earlier one; sampling RSS measures each block on its own.
"""
from __future__ import annotations

import ctypes
import gc
import os
import resource
import threading

import torch


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the lifetime peak, the best available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def release_free_memory() -> None:
    """Hand memory that glibc keeps after `free` back to the OS (malloc_trim), so that successive measurements
    start from the same floor instead of reusing what earlier work freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): peaks then include allocator reuse
        pass


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak` (bytes) and `m.before`."""

    def __init__(self, device: str, interval_s: float = 0.002) -> None:
        self.device, self.interval_s = device, interval_s
        self.before = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return self
        gc.collect()
        release_free_memory()
        self.before = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
