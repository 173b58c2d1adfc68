"""The agent's local HTTP server (the real server class, on loopback): a slow client is
answered 408 once the socket timeout passes, and never holds a thread for good."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from edge_agent.http import LocalEndpoint
from edge_agent.inference import InferenceService
from modelpack import load_pack
from modelpack.predictor import Predictor


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_that_never_arrives_gets_a_408(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    inference = InferenceService()
    inference.swap(Predictor.from_pack(load_pack(signed_pack, [keys[1]])))
    endpoint = LocalEndpoint(
        "127.0.0.1", 0, inference, lambda: {}, CollectorRegistry(), 4096, timeout_s=0.5
    ).start()
    try:
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as sock:
            start = time.monotonic()
            sock.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            answer = _read_all(sock)
            assert time.monotonic() - start < 4
        assert answer.startswith(b"HTTP/1.0 408") or answer.startswith(b"HTTP/1.1 408")
        assert b'"reason":"timeout"' in answer
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as sock:
            sock.sendall(b"GET /metadata HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b" 200 " in sock.recv(65536).split(b"\r\n")[0]
    finally:
        endpoint.stop()
