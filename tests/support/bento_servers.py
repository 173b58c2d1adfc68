"""``bentoml serve`` processes a test module needs, started at once."""

from __future__ import annotations

import re
import socket
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


def read_answer(sock: socket.socket, data: bytes = b"") -> bytes:
    """One whole HTTP answer (``data``: what was already read of it): its headers and the body
    they announce, however the bytes are split across reads (the server may send the head and
    the body in separate writes)."""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
