"""An open-loop HTTP load generator light enough to share two cores with the server it measures:
keep-alive connections driven by asyncio protocols and callbacks, requests on a fixed schedule
(a late answer never delays the next send), each answer timed at the client."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
UNANSWERED = -2  # no answer when ``open_loop``'s wait after the schedule ended
ERRORS: dict[str, int] = {}  # the last flood's connection errors, by kind


@dataclass(frozen=True)
class Shot:
    scheduled: float
    latency: float  # from the scheduled send time
    status: int  # -1: a connection error; UNANSWERED: none by the end of the wait
    # At the client: from the moment the generator started it (connect included when it opened
    # a connection) to the answer's last byte; the generator's own scheduling lag left out.
    served: float


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time, parsed just enough to
    find the status and the end of the answer. A protocol, not streams: the generator shares
    the machine's two cores with the server it measures, so each request must cost it little
    (streams cost twice as much here, aiohttp several times more)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.answered = False  # any byte of the current answer arrived
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.answered = False
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.answered = True
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result(int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(-1)


class _Connections:
    """A pool of ``_Connection``, driven by callbacks (no task per request: they cost the
    generator more than the request itself); a request takes an idle connection or opens one."""

    def __init__(self, host: str, port: int, most: int = 900) -> None:
        self.host, self.port = host, port
        self.idle: list[_Connection] = []
        # Under this process's file limit: past it, a request waits for a free connection (and
        # the wait shows as generator lag) instead of failing on the client's side.
        self.most, self.busy = most, 0
        self.waiting: deque[tuple[bytes, Callable[[int], None]]] = deque()
        self.errors: dict[str, int] = {}
        self.opening: set[asyncio.Task[None]] = set()  # kept so they are not collected

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.opening.add(task)
        task.add_done_callback(self.opening.discard)

    def start(self, request: bytes, done: Callable[[int], None]) -> None:
        """Send ``request``; ``done(status)`` once answered, with -1 for a connection error."""
        if self.busy >= self.most:
            self.waiting.append((request, done))
            return
        self.busy += 1
        conn = None
        while self.idle and conn is None:
            candidate = self.idle.pop()
            conn = None if candidate.closed else candidate
        if conn is None:
            self._spawn(self._send_new(request, done))  # opening one needs an await
        else:
            self._send_on(conn, request, done, reused=True)

    async def send(self, request: bytes) -> int:
        answered: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.start(request, answered.set_result)
        return await answered

    def _send_on(
        self, conn: _Connection, request: bytes, done: Callable[[int], None], reused: bool
    ) -> None:
        conn.send(request).add_done_callback(
            lambda f: self._answered(conn, request, done, reused, f.result())
        )

    def _answered(
        self,
        conn: _Connection,
        request: bytes,
        done: Callable[[int], None],
        reused: bool,
        status: int,
    ) -> None:
        if status == -1 and reused and not conn.answered:
            # The server closed this keep-alive connection while it sat idle (its idle
            # timeout), before our request: send again on a new one, as HTTP clients do.
            self._spawn(self._send_new(request, done))
            return
        if status == -1:
            self._error("answer: connection closed")
        else:
            self.idle.append(conn)
        self._finish(status, done)

    async def _send_new(self, request: bytes, done: Callable[[int], None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        except OSError as exc:
            self._error(f"connect: {type(exc).__name__}")
            self._finish(-1, done)
            return
        self._send_on(conn, request, done, reused=False)

    def _finish(self, status: int, done: Callable[[int], None]) -> None:
        self.busy -= 1
        done(status)
        if self.waiting and self.busy < self.most:
            self.start(*self.waiting.popleft())

    def _error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """On uvloop (installed with edgebento[cloud]): the generator then costs less CPU."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _raw_requests(url: str, bodies: list[bytes], headers: dict[str, str]) -> list[bytes]:
    parts = urlsplit(url)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return [
        (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\n{extra}Content-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]


def _pool(url: str) -> _Connections:
    parts = urlsplit(url)
    return _Connections(parts.hostname or "127.0.0.1", parts.port or 80)


async def closed_loop(
    url: str,
    bodies: list[bytes],
    headers: dict[str, str],
    seconds: float,
    clients: int = 64,
    statuses: dict[int, int] | None = None,
    on_edge: Callable[[], None] | None = None,
) -> float:
    """200s per second with ``clients`` each sending its next request when answered; every
    answer's status counted in ``statuses`` when given; ``on_edge()`` just before the first
    send and just after the last answer, the edges of the window the rate is over (the
    server's CPU is read there)."""
    pool, requests = _pool(url), _raw_requests(url, bodies, headers)
    ok = 0
    end = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal ok
        while time.perf_counter() < end:
            status = await pool.send(requests[i % len(requests)])  # not ok += await: it races
            ok += status == 200
            if statuses is not None:
                statuses[status] = statuses.get(status, 0) + 1
            i += 1

    if on_edge is not None:
        on_edge()
    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    stop = time.perf_counter()
    if on_edge is not None:
        on_edge()
    pool.close()
    return ok / (stop - start)


async def open_loop(
    url: str,
    bodies: list[bytes],
    headers: dict[str, str],
    phases: list[tuple[float, float]],
    on_phase: Callable[[int], None] | None = None,
    wait_s: float | None = None,
) -> list[Shot]:
    """Send on a fixed schedule: ``phases`` of (rate, seconds), one after the other;
    ``on_phase(i)`` when phase ``i`` begins (at its first send), ``on_phase(len(phases))`` when
    the last one ends (the server's CPU is read there, phase by phase). Answers are awaited
    ``wait_s`` after the schedule ends (all of them: None); a request without one by then is a
    shot of status ``UNANSWERED``, timed to the end of the wait."""
    pool, requests = _pool(url), _raw_requests(url, bodies, headers)
    shots: list[Shot] = []
    pending: dict[int, tuple[float, float]] = {}  # by send: (scheduled, sent)
    all_answered = asyncio.get_running_loop().create_future()

    def answered(i: int, status: int) -> None:
        if i not in pending:  # its wait ended already
            return
        scheduled, sent = pending.pop(i)
        now = time.perf_counter()
        shots.append(Shot(scheduled, now - scheduled, status, now - sent))
        if done_sending and not pending and not all_answered.done():
            all_answered.set_result(None)

    start, i, done_sending = time.perf_counter(), 0, False
    for index, (rate, seconds) in enumerate(phases):
        for k in range(int(rate * seconds)):
            scheduled = start + k / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if k == 0 and on_phase is not None:
                on_phase(index)
            pending[i] = (scheduled, time.perf_counter())
            pool.start(requests[i % len(requests)], functools.partial(answered, i))
            i += 1
        start += seconds
    if on_phase is not None:
        delay = start - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        on_phase(len(phases))
    done_sending = True
    if pending:
        try:
            await asyncio.wait_for(asyncio.shield(all_answered), wait_s)
        except TimeoutError:
            now = time.perf_counter()
            for scheduled, sent in pending.values():
                shots.append(Shot(scheduled, now - scheduled, UNANSWERED, now - sent))
            pending.clear()
    pool.close()
    ERRORS.update(pool.errors)
    return sorted(shots, key=lambda s: s.scheduled)
