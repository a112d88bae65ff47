"""Wall time, CPU time and peak memory of a job, recorded in its ``job.json``.

The peak resident memory of *this job* (not of the whole process lifetime, which
``ru_maxrss`` gives) is sampled by a daemon thread reading ``/proc/self/statm`` every
``interval_s``; where ``/proc`` is absent (macOS, Windows) the process-lifetime peak from
``resource`` is reported instead, marked as such. GPU memory, when a CUDA device is used,
comes from torch's own peak counter.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (bytes), or None where /proc is not available."""
    try:
        with open(_STATM) as fh:
            return int(fh.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def lifetime_peak_rss_bytes() -> int | None:
    """Peak resident memory over the whole process lifetime (bytes), or None."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux: KiB
    except (ImportError, OSError):
        return None


@dataclass
class ResourceUsage:
    wall_s: float
    cpu_s: float
    peak_rss_MB: float | None
    start_rss_MB: float | None
    peak_is_lifetime: bool  # True where only the process-lifetime peak could be read
    peak_gpu_MB: float | None = None

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class ResourceMonitor:
    """Context manager measuring one job: ``with ResourceMonitor(device) as mon: ...; mon.usage``."""

    def __init__(self, device: torch.device | None = None, interval_s: float = 0.05) -> None:
        self.device = device
        self.interval_s = interval_s
        self.usage: ResourceUsage | None = None
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = current_rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __enter__(self) -> "ResourceMonitor":
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._start_rss = current_rss_bytes()
        self._peak = self._start_rss or 0
        if self._start_rss is not None:
            self._thread = threading.Thread(target=self._sample, name="subtomo-memory", daemon=True)
            self._thread.start()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        end = current_rss_bytes()
        mb = 1024.0 ** 2
        if self._start_rss is not None:
            peak, lifetime = max(self._peak, end or 0) / mb, False
        else:
            life = lifetime_peak_rss_bytes()
            peak, lifetime = (life / mb if life is not None else None), True
        gpu = None
        if self.device is not None and self.device.type == "cuda":
            gpu = torch.cuda.max_memory_allocated(self.device) / mb
        self.usage = ResourceUsage(time.perf_counter() - self._wall, time.process_time() - self._cpu, peak,
                                   self._start_rss / mb if self._start_rss is not None else None, lifetime, gpu)
