"""The optional local HTTP endpoint: ``POST /infer`` (the same tensor JSON as MQTT), ``GET /metrics``
(Prometheus, the shared ``edgebento_*`` names) and ``GET /healthz``. Bound to loopback by default."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from modelpack.codec import error_body, parse_body
from modelpack.errors import EdgebentoError, InputError


class LocalEndpoint:
    def __init__(
        self,
        host: str,
        port: int,
        infer: Callable[[Any], dict[str, Any]],
        health: Callable[[], dict[str, Any]],
        registry: Any,
        max_body: int,
    ) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # access logs would drown the agent's own

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, doc: dict[str, Any]) -> None:
                self._send(status, json.dumps(doc).encode(), "application/json")

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    doc = health()
                    self._json(200 if doc.get("model") else 503, doc)
                else:
                    self._json(404, {"error": f"no such path {self.path}"})

            def do_POST(self) -> None:
                if self.path != "/infer":
                    self._json(404, {"error": f"no such path {self.path}"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    if length > max_body:
                        raise InputError(
                            f"the request body is {length} bytes; the cap is {max_body}",
                            reason="too_large",
                        )
                    self._json(200, infer(parse_body(self.rfile.read(length), max_body)))
                except InputError as exc:
                    self._json(400, error_body(exc))
                except EdgebentoError as exc:
                    self._json(503, error_body(exc))

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
