"""Disjoint CPUs for the server and the load generator of a serving benchmark.

A load generator on the same cores as the server it measures takes CPU from it in proportion to
the load it sends: a flood of four times the capacity took a third of the server's CPU away
from the capacity it was compared with (goodput per server CPU-second stayed at capacity's,
goodput per second did not). So every server of a serving benchmark (edgebento via
``bentoml serve``, the plain BentoML service, bare uvicorn, Flask) runs on the same ``server``
CPUs, all its processes and threads, with one worker per server CPU; the load generator (wrk,
or the benchmark's own open-loop generator and the process that measures) on the others.
Other work on the machine can still run on either set: the load average is kept with each run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pinning:
    server: tuple[int, ...]
    generator: tuple[int, ...]

    @property
    def disjoint(self) -> bool:
        return not set(self.server) & set(self.generator)

    @property
    def workers(self) -> int:
        """Server workers: one per server CPU (each runs ONNX Runtime on one thread)."""
        return len(self.server)

    def server_preexec(self) -> Callable[[], None]:
        """For ``Popen(preexec_fn=...)``: the child and everything it starts (workers, their
        threads) inherit the server's CPUs, none started before the pinning."""
        cpus = set(self.server)
        return lambda: os.sched_setaffinity(0, cpus)

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_cpus": list(self.server),
            "generator_cpus": list(self.generator),
            "disjoint": self.disjoint,
            "server_workers": self.workers,
            # Servers and generator inherit it (``nice -n 5`` leaves others' tests responsive).
            "niceness": os.nice(0),
        }


def split(server_cpus: int | None = None) -> Pinning:
    """The CPUs this process may use, split in two: ``server_cpus`` of them (half by default)
    for the server, the rest for the generator. One CPU: both share it (``disjoint`` false)."""
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    if len(cpus) < 2:
        return Pinning(cpus, cpus)
    n = min(max(1, server_cpus or len(cpus) // 2), len(cpus) - 1)
    return Pinning(cpus[:n], cpus[n:])


@contextmanager
def generator_side(pinning: Pinning) -> Iterator[None]:
    """This process (the open-loop generator, the measuring, wrk started from here) on the
    generator's CPUs while the block runs; its former CPUs afterwards."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(pinning.generator))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def tree_affinity(pid: int) -> dict[str, Any]:
    """The CPUs every thread of ``pid`` and its descendants may run on, as found: what the
    result records, so that a worker or a thread pool that re-pinned itself shows."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {"processes": 0, "threads": 0, "cpus": []}
    found: set[tuple[int, ...]] = set()
    threads = 0
    for proc in procs:
        try:
            tids = [t.id for t in proc.threads()]
        except psutil.NoSuchProcess:
            continue
        for tid in tids:
            try:
                found.add(tuple(sorted(os.sched_getaffinity(tid))))
            except OSError:  # the thread ended meanwhile
                continue
            threads += 1
    return {
        "processes": len(procs),
        "threads": threads,
        "cpus": [list(c) for c in sorted(found)],
    }
