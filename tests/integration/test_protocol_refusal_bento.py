"""Refusals answered by uvicorn's protocol in ``bentoml serve`` (``bentos/protocol_refusal.py``):
the same 503 as the app's, byte for byte; counted as before; the connection serves on. A queue
of 0 makes every inference a refusal decided from its headers."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from benchmarks.serving_common import Process, import_to_store, start_bento
from tests.integration.test_protocol_refusal_uvicorn import answers, head, undated
from tests.support import serving_models
from tests.support.bento_servers import started_together

pytestmark = pytest.mark.integration

BODY = b'{"inputs": {"a": [[1, 2, 3, 4]], "b": [[1, 1, 1, 1]]}}'


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]
) -> Iterator[dict[str, Process]]:
    """The add model behind a queue of 0, refused by the protocol (``protocol``) and, for the
    comparison, by the app (``app``: ``EDGEBENTO_PROTOCOL_REFUSAL=0``)."""
    from modelpack import create_pack

    work = tmp_path_factory.mktemp("protocol-refusal")
    create_pack(
        serving_models.add_two(work / "add.onnx"), work / "add", name="add", version=1, key=keys[0]
    )

    def start(name: str, **env: str) -> partial[Process]:
        # A model store each, as the other modules' servers have: two started at once from one
        # store failed twice in a row after another module's servers (zmq: address in use).
        tag = import_to_store(work / "add", keys[1], work / name)
        return partial(
            start_bento,
            work / name,
            tag,
            work,
            EDGEBENTO_WORKERS="1",
            EDGEBENTO_MAX_QUEUE="0",
            **env,
        )

    starts = {"protocol": start("protocol"), "app": start("app", EDGEBENTO_PROTOCOL_REFUSAL="0")}
    with started_together(starts) as running:
        yield running


def _connect(server: Process) -> socket.socket:
    parts = urlsplit(server.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def _refused_total(server: Process) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    found = re.findall(
        r'(?m)^edgebento_overload_rejected_total\{[^}]*reason="queue_full"[^}]*\} (\S+)', text
    )
    return sum(float(v) for v in found)


def test_a_refusal_is_the_apps_503_byte_for_byte(servers: dict[str, Process]) -> None:
    got = {}
    for name, server in servers.items():
        with _connect(server) as sock:
            sock.sendall(head("/predict", len(BODY)) + BODY)
            (got[name],) = answers(sock, 1)
    assert got["protocol"].startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nretry-after: 1\r\n" in got["protocol"]
    assert got["protocol"].endswith(b'"reason":"queue_full","retry_after_s":1}')
    assert undated(got["protocol"]) == undated(got["app"])


def test_refusals_are_counted_and_the_connection_serves_on(servers: dict[str, Process]) -> None:
    """Bodies still arriving after their 503 (whole, in pieces, chunked) are read past, and the
    next request on the connection is answered; every refusal is counted once."""
    server = servers["protocol"]
    before = _refused_total(server)
    with _connect(server) as sock:
        for _ in range(3):
            sock.sendall(head("/predict", len(BODY)))
            (refused,) = answers(sock, 1)
            assert refused.startswith(b"HTTP/1.1 503")
            sock.sendall(BODY[:10])
            sock.sendall(BODY[10:])
        sock.sendall(head("/v2/models/add/infer", None, "Transfer-Encoding: chunked\r\n"))
        (refused,) = answers(sock, 1)
        assert refused.startswith(b"HTTP/1.1 503")
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))
        sock.sendall(b"GET /metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        (metadata,) = answers(sock, 1)
    assert metadata.startswith(b"HTTP/1.1 200") and b'"add"' in metadata
    assert _refused_total(server) == before + 4


def test_pipelined_requests_keep_their_order(servers: dict[str, Process]) -> None:
    """A refusal pipelined behind a request in flight waits for its answer."""
    with _connect(servers["protocol"]) as sock:
        sock.sendall(
            b"GET /metadata HTTP/1.1\r\nHost: x\r\n\r\n"
            + head("/predict", len(BODY))
            + BODY
            + b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        got = answers(sock, 3)
    assert [a[:12] for a in got] == [b"HTTP/1.1 200", b"HTTP/1.1 503", b"HTTP/1.1 200"]
    assert b'"add"' in got[0] and got[2].endswith(b'{"ready":true}')


def test_refusals_pipelined_in_one_packet_are_each_answered_and_counted(
    servers: dict[str, Process],
) -> None:
    """Once the process is refusing, refusals read whole are answered without the parser
    (``bentos/refusal_fast_path.py``): each the app's 503, counted once, in order, and what
    follows still served (here a request the grammar leaves to the parser)."""
    server = servers["protocol"]
    before = _refused_total(server)
    one = head("/predict", len(BODY)) + BODY
    with _connect(server) as sock:
        sock.sendall(one)  # a refusal: the process is refusing
        (first,) = answers(sock, 1)
        sock.sendall(one * 4 + b"GET /metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        got = answers(sock, 5)
    with _connect(servers["app"]) as sock:
        sock.sendall(one)
        (apps,) = answers(sock, 1)
    assert {undated(a) for a in [first, *got[:4]]} == {undated(apps)}
    assert got[4].startswith(b"HTTP/1.1 200") and b'"add"' in got[4]
    assert _refused_total(server) == before + 5


def _tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_a_clients_long_timeout_values_are_not_kept(servers: dict[str, Process]) -> None:
    """The early check keeps the mapping of each x-timeout-ms value it was sent, for a flood's
    few values; a value longer than any the core parses is answered (400: not a timeout) and
    not kept. Review 107: 64 distinct 2 MB values pinned 128 MiB in each worker."""
    server = servers["protocol"]
    before = _tree_rss(server.popen.pid)
    with _connect(server) as sock:
        for index in range(64):
            value = b"%08d" % index + b"9" * (1 << 20)
            sock.sendall(head("/predict", len(BODY))[:-2] + b"x-timeout-ms: " + value + b"\r\n\r\n")
            sock.sendall(BODY)
            (answer,) = answers(sock, 1)
            assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    grown = _tree_rss(server.popen.pid) - before
    assert grown < 48 << 20, f"the server grew {grown >> 20} MiB"
