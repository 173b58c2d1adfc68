"""Figures of several runs: each headline figure is the median of its runs, kept with its range
and its count, so that a reader sees how far one run may land from another.

A figure measured in several runs is stored in the result's JSON as a *summary*:
``{"median": m, "min": a, "max": b, "runs": n, "values": [...]}``; ``benchmarks/report.py``
renders it as ``m (a–b, n runs)``. A plain number is a single run.

``load()`` says how busy the machine was around a run (other work on the same cores moves the
figures), and ``CpuMeter`` how much CPU a server's processes spent on the requests of one
measurement: CPU per request moves less with other work than requests per second do.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

SUMMARY_KEYS = frozenset({"median", "min", "max", "runs"})


def summary(values: Iterable[float], digits: int = 3) -> dict[str, Any]:
    """The median of ``values`` with their range and count (all rounded to ``digits``)."""
    found = [float(v) for v in values]
    if not found:
        raise ValueError("a summary needs at least one value")
    return {
        "median": round(statistics.median(found), digits),
        "min": round(min(found), digits),
        "max": round(max(found), digits),
        "runs": len(found),
        "values": [round(v, digits) for v in found],
    }


def is_summary(value: Any) -> bool:
    return isinstance(value, dict) and value.keys() >= SUMMARY_KEYS


def median_of(value: Any) -> Any:
    """The median of a summary; any other value as it is."""
    return value["median"] if is_summary(value) else value


def summarize(rounds: Sequence[Any], digits: int = 3) -> Any:
    """Rounds of the same nested document merged into one: every number becomes the summary of
    its values across the rounds; anything else (a flag, a text, a list) is kept as it is where
    every round agrees, else as the list of its values by round. Keys missing from a round are
    left out."""
    first = rounds[0]
    if all(isinstance(r, int | float) and not isinstance(r, bool) for r in rounds):
        return summary((float(r) for r in rounds), digits)
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(r, dict) and k in r for r in rounds)]
        return {k: summarize([r[k] for r in rounds], digits) for k in keys}
    return first if all(r == first for r in rounds) else list(rounds)


def rounds() -> int:
    """How many rounds a benchmark measures its figures in: ``EDGEBENTO_BENCH_RUNS``, 3 by
    default (a headline figure is the median of at least 3)."""
    return max(1, int(os.environ.get("EDGEBENTO_BENCH_RUNS", "3")))


def load() -> dict[str, Any]:
    """The load averages (1, 5 and 15 minutes) and the cores they are shared by."""
    one, five, fifteen = os.getloadavg()
    return {
        "load_1m": round(one, 2),
        "load_5m": round(five, 2),
        "load_15m": round(fifteen, 2),
        "logical_cores": os.cpu_count(),
    }


class CpuMeter:
    """CPU seconds spent by a process and all its descendants between ``start`` and ``stop``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = 0.0

    def read(self) -> float:
        """The CPU seconds the tree has spent so far (user and system, all its processes)."""
        return self._now()

    def _now(self) -> float:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def start(self) -> None:
        self.started = self._now()

    def stop(self) -> float:
        return self._now() - self.started


def measured(pid: int, run: Callable[[], Any]) -> tuple[Any, float]:
    """``run()``'s result and the CPU seconds ``pid``'s tree spent while it ran."""
    meter = CpuMeter(pid)
    meter.start()
    result = run()
    return result, meter.stop()
