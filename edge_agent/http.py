"""The optional local HTTP endpoint, bound to loopback by default: the serving core's HTTP
surface (``POST /infer`` or ``/predict`` with the same tensor JSON as MQTT, ``GET /metadata``,
the Open Inference Protocol under ``/v2``), ``GET /metrics`` (Prometheus, the shared
``edgebento_*`` names) and ``GET /healthz``.

What one client can cost is bounded. One thread reads and writes every connection (a selector),
and a fixed pool of ``workers`` threads answers the requests whose bodies are in: a slow client
holds a place in the connection table, never a thread. At most ``max_connections`` are open; the
next one is answered 503 ``queue_full`` and closed. Each phase of a request has its own limit:

- the head (request line and headers), ``head_timeout_s`` from its first byte;
- the body, ``body_timeout_s`` from the end of the head: past it, 408 ``timeout``, counted as
  the client's (``edgebento_input_rejected_total{reason="timeout"}``);
- the run, ``run_timeout_s`` from the end of the body: past it, 504 ``run_timeout``, counted as
  an error (the model's or ours, never the client's);
- the answer's write, ``write_timeout_s``; an idle kept-alive connection, ``idle_timeout_s``.

Content-Length is required on a POST and checked before a byte of the body is read (see
``http_wire``), so a request's total time and memory are bounded before it costs anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge_agent.config import HttpLimits
from edge_agent.http_wire import CONTINUE, MAX_HEAD_BYTES, RequestHead, head_end, parse_head, render
from edge_agent.inference import InferenceService
from edge_agent.wakeup import Wakeup
from modelpack.codec import dumps
from modelpack.errors import InputError, OverloadError
from modelpack.serving.routes import HttpRequest, HttpResponse, admit, handle_sync, refuse

log = logging.getLogger(__name__)

JSON = "application/json"
LINGER_S = 2.0  # after a closing answer, unread input is drained so the client still reads it
READ_CHUNK = 64 << 10


class _Conn:
    """One client connection: what it has sent and which phase its current request is in."""

    __slots__ = ("buf", "close_after", "deadline", "head", "out", "phase", "sock", "ticket")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.buf = bytearray()
        # head | body | run | write | idle (kept alive, no byte yet) | linger | closed
        self.phase = "head"
        self.deadline = deadline
        self.head: RequestHead | None = None
        self.out = memoryview(b"")
        self.close_after = False
        self.ticket = 0  # which request a worker's answer is for (a 504 makes the run stale)


class LocalEndpoint:
    def __init__(
        self,
        host: str,
        port: int,
        inference: InferenceService,
        health: Callable[[], dict[str, Any]],
        registry: Any,
        max_body: int,
        limits: HttpLimits | None = None,
    ) -> None:
        self.core = inference.core
        self.health, self.registry, self.max_body = health, registry, max_body
        self.limits = limits or HttpLimits()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, port), family=family, backlog=128)
        self.listener.setblocking(False)
        self.port = int(self.listener.getsockname()[1])
        self._wakeup = Wakeup()  # a worker's answer or a stop: the I/O thread selects on it
        self._selector = selectors.DefaultSelector()
        self._watching: dict[int, int] = {}  # fd -> the events registered for it
        self._conns: set[_Conn] = set()
        self._done: queue.SimpleQueue[tuple[_Conn, int, HttpResponse]] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="http-worker")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="http", daemon=True)

    def start(self) -> LocalEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        else:
            self._close_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- the I/O thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        self._selector.register(self.listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wakeup.reader, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                nearest = min((c.deadline for c in self._conns), default=now + 1.0)
                for key, mask in self._selector.select(min(1.0, max(0.0, nearest - now))):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._wakeup.drain()
                    else:
                        self._ready(key.data, mask)
                self._finish_runs()
                self._expire(time.monotonic())
        except Exception:  # never expected: log it loudly, and leave no socket open behind
            log.exception("the local HTTP endpoint stopped")
        finally:
            self._close_all()

    def _ready(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ and conn.phase != "closed":
            self._guarded(conn, self._read)
        if mask & selectors.EVENT_WRITE and conn.phase == "write":
            self._guarded(conn, self._write)

    def _guarded(self, conn: _Conn, step: Callable[..., None], *args: Any) -> None:
        try:
            step(conn, *args)
        except Exception as exc:  # one connection's fault must not end the others
            log.error("local HTTP connection failed: %s", exc, exc_info=exc)
            self._close(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors: the backlog waits for a close
                log.warning("local HTTP endpoint cannot accept: %s", exc)
                return
            sock.setblocking(False)
            if len(self._conns) >= self.limits.max_connections:
                self._turn_away(sock)
                continue
            conn = _Conn(sock, time.monotonic() + self.limits.head_timeout_s)
            self._conns.add(conn)
            self._watch(conn, selectors.EVENT_READ)

    def _turn_away(self, sock: socket.socket) -> None:
        if len(self._conns) >= 2 * self.limits.max_connections:
            sock.close()  # answering and draining costs a place too: past twice the cap, none
            return
        busy = OverloadError(
            f"the endpoint has {self.limits.max_connections} connections open; retry shortly",
            reason="queue_full",
        )
        conn = _Conn(sock, 0.0)
        self._conns.add(conn)
        self._reply(conn, refuse(self.core, busy), close=True)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client left (mid-body too): nobody to answer, nothing to count
            self._close(conn)
            return
        if conn.phase == "linger":
            return  # input after a closing answer is dropped unread
        conn.buf += data
        if conn.phase == "idle":
            conn.phase, conn.deadline = "head", time.monotonic() + self.limits.head_timeout_s
        if conn.phase == "head":
            self._on_head(conn)
        elif conn.phase == "body":
            self._on_body(conn)

    def _on_head(self, conn: _Conn) -> None:
        end = head_end(conn.buf)
        if end < 0 and len(conn.buf) <= MAX_HEAD_BYTES:
            return
        if end < 0 or end > MAX_HEAD_BYTES:
            too_long = InputError(f"the request head is over {MAX_HEAD_BYTES} bytes", "invalid")
            self._reply(conn, refuse(self.core, too_long), close=True)
            return
        raw = bytes(conn.buf[: end - 4])
        del conn.buf[:end]
        try:
            head = parse_head(raw, self.max_body)
            # Before the body is read: a request the queue cannot start in time costs no upload.
            admit(self.core, head.method, head.path, head.headers, time.monotonic())
        except (InputError, OverloadError) as exc:
            self._reply(conn, refuse(self.core, exc), close=True)
            return
        conn.head = head
        conn.phase, conn.deadline = "body", time.monotonic() + self.limits.body_timeout_s
        if head.expect_continue and len(conn.buf) < head.length:
            with contextlib.suppress(OSError):  # 25 bytes on an idle socket: the buffer takes them
                conn.sock.send(CONTINUE)
        self._on_body(conn)

    def _on_body(self, conn: _Conn) -> None:
        head = conn.head
        assert head is not None
        if len(conn.buf) < head.length:
            return
        body = bytes(conn.buf[: head.length])
        del conn.buf[: head.length]
        now = time.monotonic()
        conn.phase, conn.deadline = "run", now + self.limits.run_timeout_s
        conn.ticket += 1
        self._watch(conn, 0)  # a pipelined request waits until this one is answered
        self._pool.submit(self._work, conn, conn.ticket, head, body, now)

    def _finish_runs(self) -> None:
        while True:
            try:
                conn, ticket, answer = self._done.get_nowait()
            except queue.Empty:
                return
            if conn.phase != "run" or conn.ticket != ticket:
                continue  # answered 504 already, or the connection is gone
            assert conn.head is not None
            close = not conn.head.keep_alive
            self._guarded(conn, self._reply, answer, close)

    def _reply(self, conn: _Conn, answer: HttpResponse, close: bool) -> None:
        head_only = conn.head is not None and conn.head.method == "HEAD"
        conn.out = memoryview(render(answer, head_only, close))
        conn.close_after = close
        conn.phase, conn.deadline = "write", time.monotonic() + self.limits.write_timeout_s
        self._watch(conn, selectors.EVENT_WRITE)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            return
        now = time.monotonic()
        if conn.close_after:
            # Half-close, then drain: closing with unread input would reset the connection,
            # and the client could lose the answer (a 413 sent before its body) with it.
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(conn)
                return
            conn.phase, conn.deadline, conn.buf = "linger", now + LINGER_S, bytearray()
            self._watch(conn, selectors.EVENT_READ)
            return
        conn.head = None
        conn.phase, conn.deadline = "idle", now + self.limits.idle_timeout_s
        self._watch(conn, selectors.EVENT_READ)
        if conn.buf:  # a pipelined request came with the last one
            conn.phase, conn.deadline = "head", now + self.limits.head_timeout_s
            self._on_head(conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns if c.deadline <= now]:
            self._guarded(conn, self._expired)

    def _expired(self, conn: _Conn) -> None:
        limits = self.limits
        if conn.phase == "run":
            conn.ticket += 1  # the run's answer, if it ever comes, is dropped
            self.core.metrics.failed("run_timeout")
            doc = {
                "error": f"the model did not answer within {limits.run_timeout_s:g} s",
                "reason": "run_timeout",
            }
            self._reply(conn, HttpResponse(504, dumps(doc), {"content-type": JSON}), close=True)
        elif conn.phase == "body" or (conn.phase == "head" and conn.buf):
            part, limit = (
                ("body", limits.body_timeout_s)
                if conn.phase == "body"
                else ("request head", limits.head_timeout_s)
            )
            late = InputError(f"the {part} did not arrive within {limit:g} s", reason="timeout")
            self._reply(conn, refuse(self.core, late), close=True)
        else:  # silent since its last answer, or not reading what we write: closed
            self._close(conn)

    def _watch(self, conn: _Conn, events: int) -> None:
        fd = conn.sock.fileno()
        now = self._watching.get(fd)
        if now == events:
            return
        if events == 0:
            self._selector.unregister(conn.sock)
            del self._watching[fd]
        elif now is None:
            self._selector.register(conn.sock, events, conn)
            self._watching[fd] = events
        else:
            self._selector.modify(conn.sock, events, conn)
            self._watching[fd] = events

    def _close(self, conn: _Conn) -> None:
        if conn.phase == "closed":
            return
        self._watch(conn, 0)
        conn.phase = "closed"
        self._conns.discard(conn)
        conn.sock.close()

    def _close_all(self) -> None:
        for conn in list(self._conns):
            self._close(conn)
        self.listener.close()
        self._wakeup.close()
        self._selector.close()

    # --- the workers ---------------------------------------------------------------------------

    def _work(
        self, conn: _Conn, ticket: int, head: RequestHead, body: bytes, arrived: float
    ) -> None:
        try:
            answer = self._answer(head, body, arrived)
        except Exception as exc:  # /metrics or /healthz failed: ours, and not the model's
            log.error("local HTTP request failed: %s", exc, exc_info=exc)
            answer = HttpResponse.json(500, {"error": "internal error", "reason": "internal"})
        self._done.put((conn, ticket, answer))
        self._wakeup.set()

    def _answer(self, head: RequestHead, body: bytes, arrived: float) -> HttpResponse:
        if head.method in ("GET", "HEAD") and head.path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            metrics = generate_latest(self.registry)
            return HttpResponse(200, metrics, {"content-type": CONTENT_TYPE_LATEST})
        if head.method in ("GET", "HEAD") and head.path == "/healthz":
            doc = self.health()  # may hold paths and times: written as their str
            body = json.dumps(doc, default=str).encode()
            return HttpResponse(200 if doc.get("model") else 503, body, {"content-type": JSON})
        request = HttpRequest(head.method, head.path, head.headers, body, arrived)
        return handle_sync(self.core, request)
