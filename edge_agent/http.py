"""The optional local HTTP endpoint, bound to loopback by default: the serving core's HTTP
surface (``POST /infer`` or ``/predict`` with the same tensor JSON as MQTT, ``GET /metadata``,
the Open Inference Protocol under ``/v2``), ``GET /metrics`` (Prometheus, the shared
``edgebento_*`` names) and ``GET /healthz``.

Content-Length is required and checked before a byte of the body is read (missing: 411;
negative or not a number: 400; over the cap: 413, and the connection is closed), and every
socket has a timeout, so a slow or silent client cannot hold a server thread.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.inference import InferenceService
from modelpack.errors import InputError
from modelpack.serving.routes import HttpRequest, HttpResponse, handle_sync, refuse

SOCKET_TIMEOUT_S = 10.0
JSON = "application/json"


def content_length(raw: str | None, cap: int) -> int:
    """The declared body length, or InputError (reason and status from the core's table)."""
    if raw is None:
        raise InputError("Content-Length is required", reason="length_required")
    text = raw.strip()
    # Rejects "-1", "+5", "1e3", "", non-ASCII digits (str.isdigit takes them) and anything else.
    if not (text.isascii() and text.isdigit()):
        raise InputError(f"Content-Length {raw!r} is not a non-negative integer", reason="invalid")
    # Over the cap by its digits alone: int() of a 5000-digit string raises ValueError.
    length = int(text) if len(text) <= len(str(cap)) else cap + 1
    if length > cap:
        raise InputError(
            f"the request body is {length} bytes; the cap is {cap}", reason="too_large"
        )
    return length


class LocalEndpoint:
    def __init__(
        self,
        host: str,
        port: int,
        inference: InferenceService,
        health: Callable[[], dict[str, Any]],
        registry: Any,
        max_body: int,
        timeout_s: float = SOCKET_TIMEOUT_S,
    ) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        core = inference.core

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s  # StreamRequestHandler sets it on the socket: reads and writes

            def log_message(self, format: str, *args: Any) -> None:
                pass  # access logs would drown the agent's own

            def _send(self, answer: HttpResponse, close: bool = False) -> None:
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer.body)

            def _request(self, body: bytes = b"") -> HttpRequest:
                headers = {k.lower(): v for k, v in self.headers.items()}
                return HttpRequest(self.command, self.path.split("?")[0], headers, body)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body = generate_latest(registry)
                    self._send(HttpResponse(200, body, {"content-type": CONTENT_TYPE_LATEST}))
                elif path == "/healthz":
                    doc = health()
                    status = 200 if doc.get("model") else 503
                    self._send(HttpResponse(status, _dumps(doc), {"content-type": JSON}))
                else:
                    self._send(handle_sync(core, self._request()))

            def do_POST(self) -> None:
                try:
                    length = content_length(self.headers.get("Content-Length"), max_body)
                except InputError as exc:
                    # The body was not read: the connection cannot be reused.
                    self._send(refuse(core, exc), close=True)
                    return
                try:
                    body = self.rfile.read(length)
                except TimeoutError:
                    slow = InputError(
                        f"the body did not arrive within {timeout_s:.0f} s", reason="timeout"
                    )
                    self._send(refuse(core, slow), close=True)
                    return
                if len(body) < length:  # the client hung up mid-body: nobody to answer
                    self.close_connection = True
                    return
                self._send(handle_sync(core, self._request(body)))

            def _other(self) -> None:
                """PUT, DELETE, PATCH, OPTIONS: 405 from the route table (http.server would
                answer 501), the body left unread, so the connection closes."""
                self._send(handle_sync(core, self._request()), close=True)

            do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other

            def do_HEAD(self) -> None:
                self.do_GET()  # _send leaves out the body, as HTTP says for HEAD

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> LocalEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, default=str).encode()
