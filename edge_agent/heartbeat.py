"""A device's own vital signs for the heartbeat record: uptime, CPU, memory, threads."""

from __future__ import annotations

import os
import threading
import time
from typing import Any


class Heartbeat:
    """Uptime, CPU and RSS of this process, from the kernel's own counters (``os.times`` and
    ``/proc/self/statm``): a device pays no library for them."""

    def __init__(self) -> None:
        self.started = time.time()
        self._cpu = _cpu_seconds()
        self._at = time.monotonic()

    def sample(self) -> dict[str, Any]:
        cpu, now = _cpu_seconds(), time.monotonic()
        # Like top: CPU time over wall time since the last sample; above 100 on several cores.
        percent = 100.0 * (cpu - self._cpu) / max(now - self._at, 1e-9)
        self._cpu, self._at = cpu, now
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "cpu_percent": round(percent, 1),
            "rss_bytes": _rss_bytes(),
            "threads": threading.active_count(),
        }


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _rss_bytes() -> int:
    """Resident memory now (Linux); elsewhere the peak, which is what the OS reports."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
