"""The Lambda Runtime API, served on loopback as AWS serves it to a function's runtime.

AWS's own emulator (aws-lambda-runtime-interface-emulator) ships only from GitHub, which these
machines cannot reach. The API it emulates is three documented calls, and awslambdaric (the real
runtime client, in the image under test) makes them: ``GET .../invocation/next`` blocks until an
event is there and returns it with the request id and deadline headers; ``POST
.../invocation/{id}/response`` and ``.../{id}/error`` hand back the result; ``POST .../init/error``
reports a handler that could not start.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.services import LOOPBACK

PREFIX = "/2018-06-01/runtime"


class LambdaRuntimeApi:
    """``invoke(event)`` hands an event to the runtime that polls ``address`` and waits for its
    answer: ``("response", body)``, ``("error", body)`` or ``("init_error", body)``."""

    def __init__(self) -> None:
        self._events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._answers: dict[str, queue.Queue[tuple[str, Any]]] = {}
        self._init_errors: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._ids = itertools.count(1)
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler_class())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self._server.server_address[1]}"

    def invoke(self, event: Any, timeout: float = 120) -> tuple[str, Any]:
        request_id = f"req-{next(self._ids)}"
        answers = self._answers[request_id] = queue.Queue()
        self._events.put((request_id, json.dumps(event).encode()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return answers.get(timeout=0.5)
            except queue.Empty:
                if not self._init_errors.empty():
                    return self._init_errors.get()
        raise TimeoutError(f"no answer to {request_id} within {timeout} s")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path != f"{PREFIX}/invocation/next":
                    return self._reply(404, b"{}")
                request_id, body = api._events.get()
                deadline_ms = int((time.time() + 30) * 1000)
                self._reply(
                    200,
                    body,
                    {
                        "Lambda-Runtime-Aws-Request-Id": request_id,
                        "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
                        "Lambda-Runtime-Invoked-Function-Arn": (
                            "arn:aws:lambda:us-east-1:000000000000:function:edgebento-test"
                        ),
                        "Lambda-Runtime-Trace-Id": "Root=1-00000000-000000000000000000000000",
                    },
                )

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                parts = self.path.removeprefix(PREFIX).strip("/").split("/")
                if parts == ["init", "error"]:
                    api._init_errors.put(("init_error", json.loads(body or b"null")))
                elif len(parts) == 3 and parts[0] == "invocation" and parts[1] in api._answers:
                    kind = "response" if parts[2] == "response" else "error"
                    api._answers[parts[1]].put((kind, json.loads(body or b"null")))
                else:
                    return self._reply(404, b"{}")
                self._reply(202, b'{"status": "OK"}')

            def _reply(
                self, status: int, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
