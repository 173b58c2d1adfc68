"""``RefusingProtocol`` on a real uvicorn server (uvloop, httptools) over loopback sockets: a
refusal decided from the headers is written by the protocol, the same bytes as the app's
answer through uvicorn, the app never called; the body that still arrives is discarded and the
connection serves the next request; anything it must not take goes to the app, in order."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st

from bentos import protocol_refusal
from bentos.protocol_refusal import RefusingProtocol, header_block
from edgebento.localports import free_port
from modelpack.serving.batching import Batcher

pytestmark = pytest.mark.integration

BODY = (
    b'{"error":"the model\'s queue is full; retry shortly","reason":"queue_full","retry_after_s":1}'
)
HEADERS = [
    (b"content-type", b"application/json"),
    (b"retry-after", b"1"),
    (b"content-length", b"%d" % len(BODY)),
]
REFUSAL = (503, header_block(HEADERS), BODY)


class App:
    """Answers ``/refuse`` with the same 503 the check gives, anything else with a 200 that
    says how many body bytes it read; records every request it was called for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls.append(scope["path"])
        if scope["path"] == "/refuse":
            status, headers, body = 503, HEADERS, BODY
        else:
            size = 0
            while True:
                message = await receive()
                size += len(message.get("body", b""))
                if message["type"] == "http.disconnect" or not message.get("more_body"):
                    break
            status, body = 200, b'{"read":%d}' % size
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Served:
    def __init__(self, protocol: Any, app: Any = None, keep_alive_s: float = 5) -> None:
        self.app = app or App()
        self.port = free_port()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            http=protocol,
            loop="uvloop",
            lifespan="off",
            log_config=None,
            timeout_keep_alive=keep_alive_s,  # type: ignore[arg-type]
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        while not self.server.started:  # the server's own flag, set once it listens
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            self.thread.join(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


class Unlogged(RefusingProtocol):
    """As in the service, uvicorn's access log is off (pytest's capture gives its logger a
    handler; with one, every answer is the app's, which logs it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.access_log = False


def check(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Any:
    if dict(headers).get(b"x-check") == b"raise":
        raise RuntimeError("a bug in the check")
    return REFUSAL if path == "/refuse" else None


@pytest.fixture
def refusing(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setattr(protocol_refusal, "CHECK", check)
    with Served(Unlogged) as served:
        yield served


def head(path: str, length: int | None = 0, extra: str = "") -> bytes:
    size = "" if length is None else f"Content-Length: {length}\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{size}{extra}\r\n".encode()


def answers(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` whole answers, in the order they came, however the bytes were split."""
    data, found = b"", []
    while len(found) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            length = re.search(rb"(?im)^content-length:\s*(\d+)", data[:end])
            total = end + 4 + (int(length.group(1)) if length else 0)
            if len(data) >= total:
                found.append(data[:total])
                data = data[total:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return found


def undated(answer: bytes) -> bytes:
    return re.sub(rb"(?m)^date: [^\r]*\r\n", b"date: -\r\n", answer)


def test_a_refusal_is_the_apps_answer_byte_for_byte_without_the_app(refusing: Served) -> None:
    with refusing.connect() as sock:
        sock.sendall(head("/refuse", 2) + b"{}")
        (ours,) = answers(sock, 1)
    with Served("httptools") as plain, plain.connect() as sock:
        sock.sendall(head("/refuse", 2) + b"{}")
        (apps,) = answers(sock, 1)
    assert plain.app.calls == ["/refuse"]
    assert refusing.app.calls == []
    assert ours.startswith(b"HTTP/1.1 503 Service Unavailable\r\ndate: ")
    assert undated(ours) == undated(apps)


def test_the_body_that_still_arrives_is_discarded_and_the_connection_serves_on(
    refusing: Served,
) -> None:
    with refusing.connect() as sock:
        sock.sendall(head("/refuse", 3000))
        (refused,) = answers(sock, 1)  # before any byte of its body
        for _ in range(3):
            sock.sendall(b"x" * 1000)
        sock.sendall(head("/ok", 5) + b"hello")
        (ok,) = answers(sock, 1)
    assert refused.startswith(b"HTTP/1.1 503") and b'"reason":"queue_full"' in refused
    assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b'{"read":5}')
    assert refusing.app.calls == ["/ok"]


def test_a_chunked_body_is_discarded_too(refusing: Served) -> None:
    with refusing.connect() as sock:
        sock.sendall(head("/refuse", None, "Transfer-Encoding: chunked\r\n"))
        (refused,) = answers(sock, 1)
        sock.sendall(b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n" + head("/ok", 2) + b"hi")
        (ok,) = answers(sock, 1)
    assert refused.startswith(b"HTTP/1.1 503")
    assert ok.endswith(b'{"read":2}')
    assert refusing.app.calls == ["/ok"]


def test_pipelined_requests_are_answered_in_order(refusing: Served) -> None:
    """A request behind one in flight is not the protocol's: it waits its turn in uvicorn's
    pipeline, and the answers come in the order of the requests."""
    with refusing.connect() as sock:
        sock.sendall(head("/ok", 3) + b"abc" + head("/refuse", 2) + b"{}" + head("/ok", 1) + b"z")
        got = answers(sock, 3)
        sock.sendall(head("/refuse", 2) + b"{}")  # nothing in flight now: the protocol's
        (last,) = answers(sock, 1)
    assert [a[:12] for a in got] == [b"HTTP/1.1 200", b"HTTP/1.1 503", b"HTTP/1.1 200"]
    assert got[0].endswith(b'{"read":3}') and got[2].endswith(b'{"read":1}')
    assert undated(got[1]) == undated(last)
    assert refusing.app.calls == ["/ok", "/refuse", "/ok"]


@pytest.mark.parametrize(
    ("request_head", "closes"),
    [
        (head("/refuse", 2, "Expect: 100-continue\r\n"), False),
        (head("/refuse", 2, "Connection: close\r\n"), True),
        (b"POST /refuse HTTP/1.0\r\nContent-Length: 2\r\n\r\n", True),
        (head("/refuse", 2, "X-Check: raise\r\n"), False),
    ],
)
def test_what_the_protocol_must_not_take_goes_to_the_app(
    refusing: Served, request_head: bytes, closes: bool
) -> None:
    """Expect: 100-continue, a closing connection, HTTP/1.0, and a check that fails: the app
    answers (the same 503), with uvicorn's own handling of the connection."""
    with refusing.connect() as sock:
        sock.sendall(request_head)
        (answer,) = answers(sock, 1)
        assert answer.startswith(b"HTTP/1.1 503") and b"100 Continue" not in answer
        if closes:
            assert b"connection: close" in answer
            assert sock.recv(10) == b""  # the server closed it
        else:
            sock.sendall(b"{}" + head("/ok", 0))
            (ok,) = answers(sock, 1)
            assert ok.startswith(b"HTTP/1.1 200")
    assert refusing.app.calls[0] == "/refuse"


def test_a_client_that_leaves_mid_body_leaves_nothing_behind(
    refusing: Served, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(20):
        with refusing.connect() as sock:
            sock.sendall(head("/refuse", 10_000) + b"x" * 100)
            (refused,) = answers(sock, 1)
            assert refused.startswith(b"HTTP/1.1 503")
    with refusing.connect() as sock:
        sock.sendall(head("/ok", 1) + b"a")
        (ok,) = answers(sock, 1)
    assert ok.endswith(b'{"read":1}')
    _drained(refusing)
    assert refusing.app.calls == ["/ok"]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


class QueueApp:
    """What the service does with an inference the check let through: release its place, admit
    it again against the real Batcher, queue it and answer the model's result (the model held
    until the test lets it go); counts the requests it refused itself."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.calls = self.refused = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.loop = asyncio.get_running_loop()
        status, body = 200, b"{}"
        if scope["path"] == "/predict":
            self.calls += 1
            held = scope.pop(protocol_refusal.HELD, None)
            if held is not None:
                held.release()
            while (await receive()).get("more_body"):
                pass
            if self.batcher.full():
                self.refused += 1
                status, body = 503, BODY
            else:
                await self.batcher.submit({"x": np.zeros((1, 1), np.float32)})
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def test_requests_read_in_one_turn_of_the_loop_share_the_free_places(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twelve requests whose headers the loop reads in one turn, with two places free in the
    queue: the check holds a place for the first two it admits, so the other ten are refused
    from their headers, none by the app after uvicorn built it (what a place seen free by all
    twelve cost: ten refusals at three times the price)."""
    model_gate = threading.Event()
    batcher = Batcher(lambda feed: (model_gate.wait(30), feed)[1], max_rows=1, max_queue=2)

    def queue_check(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Any:
        return REFUSAL if batcher.full() else batcher.reserve()

    monkeypatch.setattr(protocol_refusal, "CHECK", queue_check)
    app = QueueApp(batcher)
    with Served(Unlogged, app) as served:
        socks = [served.connect() for _ in range(12)]
        try:
            for sock in socks:  # kept alive: the connections a flood's clients reuse
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                answers(sock, 1)
            assert app.loop is not None
            held, go = threading.Event(), threading.Event()
            app.loop.call_soon_threadsafe(lambda: (held.set(), go.wait(30)))  # the loop waits
            assert held.wait(30)
            for sock in socks:
                sock.sendall(head("/predict", 2) + b"{}")
            go.set()  # the loop wakes to all twelve at once
            model_gate.set()
            got = [answers(sock, 1)[0][:12] for sock in socks]
        finally:
            for sock in socks:
                sock.close()
    assert app.refused == 0
    assert got.count(b"HTTP/1.1 200") == app.calls <= 3
    assert got.count(b"HTTP/1.1 503") == 12 - app.calls
    assert batcher.reserved == 0


class CountedHold:
    def __init__(self, released: list[int], index: int) -> None:
        self.released, self.index = released, index

    def release(self) -> None:
        self.released.append(self.index)


def test_a_hold_the_app_ignores_is_released_once_when_its_request_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The app here never looks for the hold: the connection releases it as the answer
    completes, or as the client leaves mid-body; each once, none left behind."""
    released: list[int] = []
    given: list[CountedHold] = []

    def holding(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Any:
        given.append(CountedHold(released, len(given)))
        return given[-1]

    monkeypatch.setattr(protocol_refusal, "CHECK", holding)
    with Served(Unlogged) as served:
        with served.connect() as sock:
            for _ in range(3):  # answered: released as each answer completes
                sock.sendall(head("/ok", 1) + b"a")
                answers(sock, 1)
        for _ in range(3):  # the client leaves mid-body: released as the connection closes
            with served.connect() as sock:
                sock.sendall(head("/ok", 1000) + b"x" * 10)
        _drained(served)
    assert len(given) == 6
    assert sorted(released) == list(range(6))


class HeldApp(App):
    """``App``, but ``/held`` is answered only once the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.called, self.go = threading.Event(), threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("path") == "/held":
            self.called.set()
            while not self.go.is_set():
                await asyncio.sleep(0.01)
        await super().__call__(scope, receive, send)


def _protocol(served: Served) -> Any:
    (protocol,) = served.server.server_state.connections
    return protocol


def _until(condition: Any) -> None:
    for _ in range(3000):  # a condition the server's loop reaches on its own, within 30 s
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError("the server never got there")


def test_a_connection_keeps_one_keep_alive_timer_and_closes_when_idle_as_uvicorn_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvicorn arms a keep-alive timer after each answer and cancels it as the next request
    arrives; the protocol keeps the one armed (a timer made and freed per request was a
    quarter of a refusal's CPU). What a client sees is the same: a timer that fires while a
    request is in flight leaves the connection open, its answer comes, the connection serves
    on, and once idle for the keep-alive time it is closed."""
    monkeypatch.setattr(protocol_refusal, "CHECK", check)
    # A keep-alive longer than the round trips can take on a busy machine: one timer for all.
    with Served(Unlogged, keep_alive_s=60) as served, served.connect() as sock:
        timers = []
        for _ in range(5):
            sock.sendall(head("/refuse", 2) + b"{}")
            (refused,) = answers(sock, 1)
            assert refused.startswith(b"HTTP/1.1 503")
            timers.append(_protocol(served).timeout_keep_alive_task)
        assert timers[0] is not None and all(t is timers[0] for t in timers)
    app = HeldApp()
    with Served(Unlogged, app, keep_alive_s=0.5) as served, served.connect() as sock:
        sock.sendall(head("/refuse", 2) + b"{}")
        assert answers(sock, 1)[0].startswith(b"HTTP/1.1 503")
        sock.sendall(head("/held", 1) + b"a")
        assert app.called.wait(30)
        # The timer armed by the last refusal fires with this request in flight.
        _until(lambda: _protocol(served).timeout_keep_alive_task is None)
        app.go.set()
        (ok,) = answers(sock, 1)
        assert ok.endswith(b'{"read":1}')
        sock.sendall(head("/ok", 1) + b"b")
        (again,) = answers(sock, 1)
        assert again.endswith(b'{"read":1}')
        assert sock.recv(10) == b""  # idle now: closed by the server
    assert app.calls == ["/held", "/ok"]


def test_a_request_in_the_packet_of_a_refusal_is_in_flight_when_the_timer_fires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pipelining client sends a refused request and one the app takes in one packet: the
    refusal marked the connection idle before the second was parsed, and the timer then closed
    it with the second in flight, its answer lost. As uvicorn does, it stays open."""
    monkeypatch.setattr(protocol_refusal, "CHECK", check)
    app = HeldApp()
    with Served(Unlogged, app, keep_alive_s=0.3) as served, served.connect() as sock:
        sock.sendall(head("/refuse", 2) + b"{}" + head("/held", 1) + b"a")
        assert app.called.wait(30)
        # The timer the refusal armed fires with /held in flight (or has closed the connection).
        _until(lambda: not served.server.server_state.connections or _protocol_timer_fired(served))
        app.go.set()
        got = answers(sock, 2)
        assert [g[:12] for g in got] == [b"HTTP/1.1 503", b"HTTP/1.1 200"], got
        assert got[1].endswith(b'{"read":1}')
    assert app.calls == ["/held"]


def _protocol_timer_fired(served: Served) -> bool:
    return bool(_protocol(served).timeout_keep_alive_task is None)


def test_a_client_that_reads_no_answers_is_refused_by_uvicorns_path_which_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that pipelines refused requests and never reads: once the transport's buffer
    is over its high-water mark, the protocol writes no more refusals itself (it wrote each
    one it read, for a client that never reads: the server's memory grew without bound);
    uvicorn's path answers and stops reading until the client reads."""
    monkeypatch.setattr(protocol_refusal, "CHECK", check)
    one = head("/refuse", 2) + b"{}"
    data = one * (32_000_000 // len(one))  # whole requests; more than the sockets buffer

    def send(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # closed below while the server stopped reading
            sock.sendall(data)

    with Served(Unlogged) as served, served.connect() as sock:
        sock.settimeout(None)
        sender = threading.Thread(target=send, args=(sock,), daemon=True)
        sender.start()

        def stalled() -> bool:
            connections = served.server.server_state.connections
            if not connections:
                return False
            flow = next(iter(connections)).flow
            return bool(flow.read_paused and flow.write_paused)

        # The protocol before read and answered all 32 MB; this one stops reading.
        _until(lambda: not sender.is_alive() or stalled())
        buffered = _protocol(served).transport.get_write_buffer_size()
        assert buffered < 1_000_000, buffered
        assert sender.is_alive()  # the client's bytes wait in its socket, not in the server
        sock.shutdown(socket.SHUT_RDWR)
    sender.join(10)


class Parsing(Unlogged):
    """``Unlogged``, counting the requests httptools began to parse."""

    parsed = 0

    def on_message_begin(self) -> None:
        Parsing.parsed += 1
        super().on_message_begin()


@pytest.fixture
def parsing(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setattr(protocol_refusal, "CHECK", check)
    monkeypatch.setattr(Parsing, "parsed", 0)
    # Not refusing at first (raising=False: the test also runs on the code before, to fail).
    recent = getattr(protocol_refusal, "RECENT", 8)
    monkeypatch.setattr(protocol_refusal, "_admitted_in_row", recent, raising=False)
    with Served(Parsing) as served:
        yield served


def test_refused_requests_read_whole_are_answered_without_the_parser(parsing: Served) -> None:
    """While the process is refusing, the refused requests whose bytes are all read are
    answered without httptools, several in a packet, in order; the first it does not refuse
    (here one the app takes) and everything after it go to the parser (the refusal behind it
    waits its turn in uvicorn's pipeline, as before)."""
    refuse = head("/refuse", 2) + b"{}"
    with parsing.connect() as sock:
        sock.sendall(refuse)  # parsed: nothing refused before it
        assert answers(sock, 1)[0].startswith(b"HTTP/1.1 503")
        assert Parsing.parsed == 1
        sock.sendall(refuse * 3 + head("/ok", 1) + b"a" + refuse)
        got = answers(sock, 5)
    assert [a[:12] for a in got] == [b"HTTP/1.1 503"] * 3 + [b"HTTP/1.1 200", b"HTTP/1.1 503"]
    assert len({undated(a) for a in got[:3] + got[4:]}) == 1
    assert Parsing.parsed == 3  # the first, /ok and the refusal behind it
    assert parsing.app.calls == ["/ok", "/refuse"]
    assert parsing.server.server_state.total_requests == 6


def test_a_process_not_refusing_parses_every_request(parsing: Served) -> None:
    """Once ``RECENT`` checks in a row let their requests through, the process is not refusing
    and the fast path is not tried: a refusal is parsed again (and makes it refusing)."""
    ok, refuse = head("/ok", 1) + b"a", head("/refuse", 2) + b"{}"
    with parsing.connect() as sock:
        sock.sendall(refuse)
        answers(sock, 1)
        for _ in range(protocol_refusal.RECENT):
            sock.sendall(ok)
            answers(sock, 1)
        before = Parsing.parsed
        sock.sendall(refuse)
        answers(sock, 1)
        assert Parsing.parsed == before + 1
        sock.sendall(refuse)
        answers(sock, 1)
        assert Parsing.parsed == before + 1  # refusing again: the fast path's


def test_a_request_the_fast_path_does_not_recognise_goes_to_the_parser_with_the_rest(
    parsing: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused request, then one llhttp rejects: the same answers as without the fast path
    (the 503, uvicorn's 400, the connection closed)."""
    got = {}
    for recent in (0, 10**9):
        monkeypatch.setattr(protocol_refusal, "RECENT", recent)
        with parsing.connect() as sock:
            sock.sendall(head("/refuse", 2) + b"{}" + b"POST /refuse HTTP/1.1\r\nA: b\nc\r\n\r\n")
            got[recent] = answers(sock, 3)
    assert [undated(a) for a in got[0]] == [undated(a) for a in got[10**9]]
    assert [a[:12] for a in got[0]] == [b"HTTP/1.1 503", b"HTTP/1.1 400"]


# Requests llhttp reads on a kept-alive HTTP/1.1 connection: in the fast path's grammar or not
# (percent-encoded, absolute-form, chunked, obs-text, odd spacing), refused, let through, given
# a Hold, or failing the check.
def _request(path: str, body: bytes, extra: bytes = b"", target: bytes | None = None) -> bytes:
    line = b"POST %s HTTP/1.1\r\n" % (target or path.encode())
    return line + b"Host: x\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


TEMPLATES = [
    lambda body: _request("/refuse", body),
    lambda body: _request("/refuse", body, target=b"/re%66use?x=1"),
    lambda body: _request("/refuse", body, target=b"http://x/refuse"),
    lambda body: _request("/refuse", body, b"X-Obs: \xe9\r\n"),
    lambda body: _request("/refuse", body, b"x-A:\t \tb \t\r\nConnection: keep-alive\r\n"),
    lambda body: _request("/refuse", body, b"X-Check: raise\r\n"),
    lambda body: (
        (
            b"POST /refuse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (len(body), body)
        )
        if body
        else b"POST /refuse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    lambda body: _request("/ok", body),
    lambda body: _request("/hold", body),
    lambda body: b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n",
]


@settings(max_examples=60)
@given(
    st.lists(
        st.tuples(st.sampled_from(range(len(TEMPLATES))), st.binary(max_size=6)),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.integers(0, 10_000), max_size=4),
)
def test_the_answers_are_the_same_with_the_fast_path_and_without(
    chosen: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    """Pipelined requests, sent in pieces cut anywhere: with the fast path always tried and
    never, the same bytes come back, no request is put to the check twice or answered twice,
    and every Hold is released once. Which requests are checked is not compared: a request
    parsed while the one before it is still in flight goes to the app unchecked, in both modes,
    and whether it is depends on when the app's answer completes (a CI run saw a /hold checked
    in one mode and not in the other, the same answers coming back)."""
    stream = b"".join(TEMPLATES[index](body) for index, body in chosen)
    bounds = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    seen = {}
    for recent in (0, 10**9):
        recording = Recording()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(protocol_refusal, "CHECK", recording)
            patch.setattr(protocol_refusal, "RECENT", recent)
            with Served(Unlogged) as served:
                with served.connect() as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    for piece in pieces:
                        sock.sendall(piece)
                    got = [undated(a) for a in answers(sock, len(chosen))]
                _drained(served)
        assert sorted(recording.released) == list(range(len(recording.holds)))
        _each_once(chosen, recording.asked, served.app.calls)
        seen[recent] = got
    assert seen[0] == seen[10**9]
    assert len(seen[0]) == len(chosen)


PATHS = ["/refuse"] * 7 + ["/ok", "/hold", None]  # what the check is asked, by template


def _each_once(chosen: list[tuple[int, bytes]], asked: list[Any], calls: list[str]) -> None:
    """No request put to the check more often than the stream has it, none answered twice."""
    sent = collections.Counter(PATHS[index] for index, _ in chosen)
    for path, times in collections.Counter(path for _, path, _ in asked).items():
        assert times <= sent[path], (path, asked)
    assert len(calls) <= len(chosen)


class Recording:
    """``check``, recording what it is asked, with a Hold for ``/hold``."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, list[tuple[bytes, bytes]]]] = []
        self.released: list[int] = []
        self.holds: list[CountedHold] = []

    def __call__(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Any:
        self.asked.append((method, path, headers))
        if path == "/hold":
            self.holds.append(CountedHold(self.released, len(self.holds)))
            return self.holds[-1]
        return check(method, path, headers)


def _drained(served: Served) -> None:
    connections = served.server.server_state.connections

    async def drained() -> None:  # the server drops each connection when its loop sees it close
        while connections:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(drained(), 10))
