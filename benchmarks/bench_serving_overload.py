"""Overload: an open-loop flood at 4x the measured capacity for 8 s, on every request path.

A model of about 1.4 ms a request (``tests.support.serving_models.slow``, one request per batch,
one worker, one ORT thread) so that a Python load generator on the same two cores can reach 4x
its capacity; then the same flood on models of twice and four times the cost, which shows how
much of the goodput the HTTP work of refusing 3x capacity takes on two shared cores. For each path (tensor JSON, tensor JSON with b64, OIP JSON, OIP with Triton's
binary extension), in one run:

1. capacity: 200s per second with 64 closed-loop clients for 4 s;
2. the flood: requests sent on a fixed schedule (open loop: a late answer never delays the next
   send) at 4x capacity for 8 s; latency counts from the scheduled send time, so a stalled
   server cannot hide behind a stalled client (no coordinated omission);
3. recovery: the schedule drops to half the capacity for 2 s; recovery is how long after the
   flood every answer is a 200 again.

Targets (issue 10): only 200 and 503; the slowest answer within the deadline plus one batch;
goodput at least 90% of capacity; normal service within 1 s.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.serving_common import Process, import_to_store, start_bento

CAPACITY_S, FLOOD_S, RECOVERY_S, FACTOR = 4.0, 8.0, 2.0, 4.0
DEADLINE_S = 2.0
WIDTH = 256
ERRORS: dict[str, int] = {}  # the last flood's connection errors, by kind
T = TypeVar("T")


@dataclass(frozen=True)
class Shot:
    scheduled: float
    latency: float  # from the scheduled send time
    status: int  # -1: a connection error
    served: float  # from the moment the generator actually sent it (its own lag left out)


def _bodies(path: str, rng: np.random.Generator, n: int = 64) -> tuple[list[bytes], dict[str, str]]:
    xs = [rng.standard_normal((1, WIDTH)).astype(np.float32) for _ in range(n)]
    if path == "tensor_json":
        return [json.dumps({"inputs": {"x": x.tolist()}}).encode() for x in xs], {}
    if path == "tensor_b64":
        return [
            json.dumps(
                {
                    "inputs": {
                        "x": {
                            "dtype": "float32",
                            "shape": [1, WIDTH],
                            "b64": base64.b64encode(x.tobytes()).decode(),
                        }
                    }
                }
            ).encode()
            for x in xs
        ], {}
    if path == "oip_json":
        return [
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [1, WIDTH],
                            "datatype": "FP32",
                            "data": x.reshape(-1).tolist(),
                        }
                    ]
                }
            ).encode()
            for x in xs
        ], {}
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, WIDTH],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 4 * WIDTH},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return [header + x.tobytes() for x in xs], {"inference-header-content-length": str(len(header))}


URLS = {
    "tensor_json": "/predict",
    "tensor_b64": "/predict",
    "oip_json": "/v2/models/slow/infer",
    "oip_binary": "/v2/models/slow/infer",
}


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


def _run(coro: Coroutine[Any, Any, T]) -> T:
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


async def _closed_loop(
    url: str, bodies: list[bytes], headers: dict[str, str], seconds: float
) -> float:
    pool, requests = _pool(url), _raw_requests(url, bodies, headers)
    ok = 0
    end = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal ok
        while time.perf_counter() < end:
            status = await pool.send(requests[i % len(requests)])  # not ok += await: it races
            ok += status == 200
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(64)))
    pool.close()
    return ok / (time.perf_counter() - start)


async def _open_loop(
    url: str, bodies: list[bytes], headers: dict[str, str], phases: list[tuple[float, float]]
) -> list[Shot]:
    """Send on a fixed schedule: ``phases`` of (rate, seconds), one after the other."""
    pool, requests = _pool(url), _raw_requests(url, bodies, headers)
    shots: list[Shot] = []
    total = sum(int(rate * seconds) for rate, seconds in phases)
    all_answered = asyncio.get_running_loop().create_future()

    def answered(scheduled: float, sent: float, status: int) -> None:
        now = time.perf_counter()
        shots.append(Shot(scheduled, now - scheduled, status, now - sent))
        if len(shots) == total and not all_answered.done():
            all_answered.set_result(None)

    start, i = time.perf_counter(), 0
    for rate, seconds in phases:
        for k in range(int(rate * seconds)):
            scheduled = start + k / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pool.start(
                requests[i % len(requests)],
                functools.partial(answered, scheduled, time.perf_counter()),
            )
            i += 1
        start += seconds
    if total:
        await all_answered
    pool.close()
    ERRORS.update(pool.errors)
    return sorted(shots, key=lambda s: s.scheduled)


def _one_batch_s(url: str, body: bytes, headers: dict[str, str]) -> float:
    import httpx

    times = []
    with httpx.Client(timeout=10) as http:
        for _ in range(50):
            start = time.perf_counter()
            http.post(url, content=body, headers=headers)
            times.append(time.perf_counter() - start)
    return max(times)


def _judge(
    shots: list[Shot], capacity: float, flood_end: float, one_batch: float
) -> dict[str, Any]:
    flood = [s for s in shots if s.scheduled < flood_end]
    after = [s for s in shots if s.scheduled >= flood_end]
    statuses: dict[str, int] = {}
    for s in shots:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    goodput = sum(s.status == 200 for s in flood) / FLOOD_S
    recovery = 0.0
    for index, s in enumerate(after):
        if all(t.status == 200 and t.latency < 0.25 for t in after[index:]):
            recovery = max(0.0, s.scheduled - flood_end)
            break
    else:
        recovery = float("inf")
    slowest = max(s.served for s in shots)
    lag = max(s.latency - s.served for s in shots)
    bound = DEADLINE_S + one_batch
    return {
        "capacity_rps": round(capacity, 1),
        "offered_rps": round(capacity * FACTOR, 1),
        "statuses": statuses,
        "goodput_rps": round(goodput, 1),
        "goodput_of_capacity": round(goodput / capacity, 3),
        "slowest_s": round(slowest, 3),
        "deadline_plus_one_batch_s": round(bound, 3),
        "slowest_from_schedule_s": round(max(s.latency for s in shots), 3),
        "generator_lag_max_s": round(lag, 3),
        "p99_flood_s": round(float(np.percentile([s.served for s in flood], 99)), 3),
        "recovery_s": round(recovery, 3),
        "targets": {
            "only_200_and_503": set(statuses) <= {"200", "503"},
            "slowest_le_deadline_plus_one_batch": slowest <= bound,
            "goodput_ge_90pct_of_capacity": goodput >= 0.9 * capacity,
            "recovery_le_1s": recovery <= 1.0,
        },
    }


def _run_path(base: str, path: str) -> dict[str, Any]:
    bodies, headers = _bodies(path, np.random.default_rng(0))
    url = base + URLS[path]
    one_batch = _one_batch_s(url, bodies[0], headers)
    capacity = _run(_closed_loop(url, bodies, headers, CAPACITY_S))
    # The generator yields the CPU to the server it measures (they share the cores): its own
    # lag is reported apart, and the slowest answer is timed from the real send.
    phases = [(capacity * FACTOR, FLOOD_S), (capacity / 2, RECOVERY_S)]
    ERRORS.clear()
    load_before = os.getloadavg()[0]
    shots = _run(_open_loop(url, bodies, headers, phases))
    flood_end = shots[0].scheduled + FLOOD_S if shots else 0.0
    return {
        **_judge(shots, capacity, flood_end, one_batch),
        "connection_errors": dict(ERRORS),
        "load_average_1m_before": round(load_before, 2),
    }


DEPTH = 128  # the model of the targets: 128 MatMul+Tanh of 256, about 1.4 ms a request here
CURVE_DEPTHS = (256, 512)  # the same flood on costlier models (tensor JSON only)


def _serve_slow(work: Path, key: Path, pub: Path, depth: int) -> Process:
    from modelpack import create_pack
    from tests.support import serving_models

    model = serving_models.slow(work / f"slow-{depth}.onnx", width=WIDTH, depth=depth)
    create_pack(model, work / f"pack-{depth}", name="slow", version=1, key=key)
    home = work / f"bentoml-{depth}"
    tag = import_to_store(work / f"pack-{depth}", pub, home)
    return start_bento(
        home,
        tag,
        work,
        EDGEBENTO_WORKERS="1",
        EDGEBENTO_THREADS="1",
        EDGEBENTO_MAX_BATCH="1",
        EDGEBENTO_DEADLINE_S=str(DEADLINE_S),
    )


def run(results_dir: Path) -> dict[str, Any]:
    from modelpack import generate_keypair

    console = Console()
    figures: dict[str, Any] = {}
    curve: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        work = Path(tmp)
        key, pub = generate_keypair(work / "keys")
        server = _serve_slow(work, key, pub, DEPTH)
        try:
            for path in URLS:
                console.print(f"flood on {path} ...")
                figures[path] = _run_path(server.url, path)
        finally:
            server.stop()
        # How goodput depends on what a request costs the model: the HTTP work of refusing
        # 3x capacity shares the two cores with the model (and with this generator).
        for depth in (DEPTH, *CURVE_DEPTHS):
            if depth == DEPTH:
                f = figures["tensor_json"]
            else:
                console.print(f"flood on tensor_json, a model of depth {depth} ...")
                server = _serve_slow(work, key, pub, depth)
                try:
                    f = _run_path(server.url, "tensor_json")
                finally:
                    server.stop()
            curve.append(
                {
                    "depth": depth,
                    "ms_per_request_at_capacity": round(1000 / f["capacity_rps"], 2),
                    "capacity_rps": f["capacity_rps"],
                    "goodput_of_capacity": f["goodput_of_capacity"],
                    "slowest_s": f["slowest_s"],
                    "statuses": f["statuses"],
                }
            )
    table = Table(title=f"open-loop flood at {FACTOR:.0f}x capacity for {FLOOD_S:.0f} s")
    for col in ("path", "capacity", "goodput", "statuses", "slowest", "bound", "recovery"):
        table.add_column(col)
    for path, f in figures.items():
        table.add_row(
            path,
            f"{f['capacity_rps']:.0f}/s",
            f"{f['goodput_rps']:.0f}/s ({f['goodput_of_capacity']:.0%})",
            " ".join(f"{k}:{v}" for k, v in sorted(f["statuses"].items())),
            f"{f['slowest_s']:.2f} s",
            f"{f['deadline_plus_one_batch_s']:.2f} s",
            f"{f['recovery_s']:.2f} s",
        )
    console.print(table)
    by_cost = Table(title="the same flood (tensor JSON) on costlier models")
    for col in ("depth", "ms a request", "capacity", "goodput", "slowest"):
        by_cost.add_column(col)
    for c in curve:
        by_cost.add_row(
            str(c["depth"]),
            f"{c['ms_per_request_at_capacity']:.2f}",
            f"{c['capacity_rps']:.0f}/s",
            f"{c['goodput_of_capacity']:.0%}",
            f"{c['slowest_s']:.2f} s",
        )
    console.print(by_cost)
    met = all(all(f["targets"].values()) for f in figures.values())
    worst = min(f["goodput_of_capacity"] for f in figures.values())
    return {
        "headline": (
            f"4x flood, 4 paths: goodput >= {worst:.0%} of capacity, slowest "
            f"{max(f['slowest_s'] for f in figures.values()):.2f} s (deadline {DEADLINE_S:.0f} s), "
            f"statuses {sorted({k for f in figures.values() for k in f['statuses']})}"
        ),
        "targets_met": met,
        "figures": figures,
        "by_model_cost": curve,
        "setup": (
            f"slow model ({DEPTH} MatMul+Tanh of {WIDTH}), 1 worker, 1 ORT thread, 1 request per "
            f"batch, deadline {DEADLINE_S} s, default queue of 256; an open-loop generator "
            "(asyncio protocols on uvloop) on the same two cores"
        ),
        "note": "2 shared cores (load generator, server and other work on the same machine): noisy",
    }
