"""``bentoml serve`` processes a test module needs, started at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from benchmarks.serving_common import Process


@contextmanager
def started_together(starts: dict[str, Callable[[], Process]]) -> Iterator[dict[str, Process]]:
    """The servers ``starts`` start, by name, all started at once (a start is mostly one core
    importing, and the other is free); every one that started is stopped on exit, also when
    another failed to start."""
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = {name: pool.submit(start) for name, start in starts.items()}
    running = {name: f.result() for name, f in futures.items() if f.exception() is None}
    try:
        for future in futures.values():
            future.result()  # a failed start's error
        yield running
    finally:
        for process in running.values():
            process.stop()
