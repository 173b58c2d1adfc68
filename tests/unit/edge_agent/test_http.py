"""The agent's local HTTP server (the real server class, on loopback): each phase of a request has
a time limit (a slow head or body is a 408, a run past its limit a 504), slow clients hold no
thread, connections are capped, and a body's end is never ambiguous."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edge_agent.config import HttpLimits
from edge_agent.http import LocalEndpoint
from edge_agent.inference import InferenceService
from modelpack import load_pack
from modelpack.metrics import InferenceMetrics
from modelpack.predictor import Predictor

GOOD = b'{"inputs": {"x": [[1, 2, 3, 4, 5, 6, 7, 8]]}}'


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _body(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def _post(body: bytes, *extra: bytes, path: bytes = b"/infer") -> bytes:
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: x", *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@contextmanager
def _endpoint(
    signed_pack: Path,
    keys: tuple[Path, Path],
    health: Callable[[], dict[str, Any]] = dict,
    **limits: Any,
) -> Iterator[tuple[LocalEndpoint, CollectorRegistry]]:
    registry = CollectorRegistry()
    inference = InferenceService(InferenceMetrics(registry=registry))
    inference.swap(Predictor.from_pack(load_pack(signed_pack, [keys[1]])))
    endpoint = LocalEndpoint(
        "127.0.0.1", 0, inference, health, registry, 4096, HttpLimits(**limits)
    ).start()
    try:
        yield endpoint, registry
    finally:
        endpoint.stop()


def _ask(port: int, raw: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return _read_all(sock)


def test_a_body_that_never_arrives_gets_a_408_counted_as_the_clients(
    signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    with _endpoint(signed_pack, keys, body_timeout_s=0.5) as (endpoint, registry):
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as sock:
            start = time.monotonic()
            sock.sendall(_post(b"{", b"Content-Length: 100"))
            answer = _read_all(sock)
            assert time.monotonic() - start < 4
        assert _status(answer) == 408 and _body(answer)["reason"] == "timeout"
        assert registry.get_sample_value("edgebento_input_rejected_total", {"reason": "timeout"})
        assert not registry.get_sample_value("edgebento_requests_total", {"outcome": "error"})
        answer = _ask(endpoint.port, b"GET /metadata HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert _status(answer) == 200


def test_fifty_clients_dripping_a_byte_at_a_time_hold_no_thread_and_get_408_in_time(
    signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    """Finding 7: 50 connections sending a byte every 3 s were held 24 s (the timeout was per
    read), with a thread each. Now the head has 1.5 s in all, and the threads stay the pool's."""
    limits = {"head_timeout_s": 1.5, "workers": 2, "max_connections": 64}
    head = b"POST /infer HTTP/1.1\r\nHost: x\r\nUser-Agent: drip\r\n"
    quick = _post(GOOD, b"Content-Length: %d" % len(GOOD), b"Connection: close")
    answers: list[bytes] = []
    with _endpoint(signed_pack, keys, **limits) as (endpoint, _):
        before = threading.active_count()
        pending = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(50)]
        start = time.monotonic()
        try:
            for i in range(len(head)):  # 0.3 s a byte: the whole head would take 12 s
                for sock in pending:
                    sock.send(head[i : i + 1])
                # A client that is not slow is answered meanwhile, without waiting its turn.
                assert _status(_ask(endpoint.port, quick)) == 200
                assert threading.active_count() <= before + 2  # the pool, never one per client
                time.sleep(0.3)
                answered, _, _ = select.select(pending, [], [], 0)
                for sock in answered:
                    sock.settimeout(5)
                    answers.append(_read_all(sock))
                    pending.remove(sock)
                    sock.close()
                if not pending:
                    break
            held = time.monotonic() - start
        finally:
            for sock in pending:
                sock.close()
    assert not pending and all(_status(a) == 408 for a in answers), {a[:40] for a in answers}
    assert held < 4.5, held


def test_connections_past_the_cap_are_turned_away_with_a_503(
    signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    with _endpoint(signed_pack, keys, max_connections=4) as (endpoint, registry):
        idle = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(4)]
        try:  # accepted first: the listen queue is first come, first served
            answer = _ask(endpoint.port, b"")
            assert _status(answer) == 503 and _body(answer)["reason"] == "queue_full"
            assert registry.get_sample_value(
                "edgebento_overload_rejected_total", {"reason": "queue_full"}
            )
        finally:
            for sock in idle:
                sock.close()
        # Their places are free once the endpoint has read their ends: until then, a 503.
        deadline = time.monotonic() + 10
        good = _post(GOOD, b"Content-Length: %d" % len(GOOD), b"Connection: close")
        while _status(ok := _ask(endpoint.port, good)) == 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _status(ok) == 200


def test_past_twice_the_cap_a_connection_is_closed_unanswered(
    signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    """A refusal lingers to drain what the client sent: a flood of connections that never
    close must not hold sockets without bound."""
    with _endpoint(signed_pack, keys, max_connections=2) as (endpoint, _):
        # All at once (the listen queue is first come, first served): two places, two refusals
        # lingering, then none.
        held = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) for _ in range(5)]
        try:
            for sock in held[2:4]:
                assert sock.recv(12) == b"HTTP/1.1 503"
            with contextlib.suppress(ConnectionResetError):  # closed at once: as good as an end
                assert held[4].recv(100) == b""
        finally:
            for sock in held:
                sock.close()


@pytest.mark.parametrize(
    "headers",
    [
        [b"Content-Length: %d" % len(GOOD), b"Transfer-Encoding: chunked"],
        [b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(GOOD)],
        [b"Transfer-Encoding: identity"],
        [b"Content-Length: 5", b"Content-Length: %d" % len(GOOD)],
        [b"Content-Length: %d" % len(GOOD), b"Content-Length: %d" % len(GOOD)],
        [b"Content-Length: %d, %d" % (len(GOOD), len(GOOD))],
        [b"Content-Length : %d" % len(GOOD)],
        [b"Content-Length: %d" % len(GOOD), b" folded"],
    ],
)
def test_a_body_whose_end_is_ambiguous_is_refused_with_400(
    signed_pack: Path, keys: tuple[Path, Path], headers: list[bytes]
) -> None:
    """The first of two Content-Lengths was taken, and Transfer-Encoding was ignored beside
    one: a proxy in front could read another request where the agent reads a body."""
    with _endpoint(signed_pack, keys) as (endpoint, _):
        answer = _ask(endpoint.port, _post(GOOD, *headers))
        assert _status(answer) == 400, answer[:200]
        assert _body(answer)["reason"] == "invalid" and _body(answer)["error"]


def test_a_run_past_its_limit_is_a_504_counted_as_an_error(
    signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    def stuck() -> dict[str, Any]:
        time.sleep(3)
        return {"model": "x"}

    with _endpoint(signed_pack, keys, stuck, run_timeout_s=0.5) as (endpoint, registry):
        start = time.monotonic()
        answer = _ask(endpoint.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert time.monotonic() - start < 2.5
        assert _status(answer) == 504 and _body(answer)["reason"] == "run_timeout"
        assert registry.get_sample_value("edgebento_requests_total", {"outcome": "error"}) == 1
        assert registry.get_sample_value(
            "edgebento_request_errors_total", {"reason": "run_timeout"}
        )


def test_kept_alive_and_pipelined_requests_are_answered_in_order(
    signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    one = _post(GOOD, b"Content-Length: %d" % len(GOOD))
    oip = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [[0.5] * 8]}]}
    ).encode()
    two = _post(oip, b"Content-Length: %d" % len(oip), path=b"/v2/models/tiny/infer")
    last = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with _endpoint(signed_pack, keys) as (endpoint, _):
        answer = _ask(endpoint.port, one + two + last)
    parts = answer.split(b"HTTP/1.1 ")[1:]
    assert [p[:3] for p in parts] == [b"200"] * 3, answer[:300]
    assert b'"probs":[[' in parts[0] and b'"model_name":"tiny"' in parts[1]
    assert parts[2].endswith(b'{"ready":true}')


def test_expect_100_continue_is_answered_before_the_body(
    signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    with (
        _endpoint(signed_pack, keys) as (endpoint, _),
        socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as sock,
    ):
        sock.sendall(_post(b"", b"Content-Length: %d" % len(GOOD), b"Expect: 100-continue"))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(GOOD)
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")


def test_an_idle_kept_alive_connection_is_closed_silently(
    signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    with _endpoint(signed_pack, keys, idle_timeout_s=0.3) as (endpoint, _):
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            start = time.monotonic()
            answer = _read_all(sock)  # the answer, then the close after 0.3 s idle
            assert time.monotonic() - start < 3
        assert answer.count(b"HTTP/1.1 ") == 1 and _status(answer) == 200
