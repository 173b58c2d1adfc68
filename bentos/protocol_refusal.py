"""Under a flood, the core's refusals are answered by uvicorn's HTTP protocol itself.

A refusal is decided from the request's headers alone (``routes.admit``: the model's queue
cannot start it before its deadline), but uvicorn builds the whole request for the app first: a
scope, a ``RequestResponseCycle`` with its event, a task and its callbacks, then the ASGI
messages of the answer, each header checked against two regular expressions. Under the 4x flood
of ``benchmarks/bench_serving_overload.py`` three requests in four are refused, and that
machinery cost more than the refusal itself: CPU the model's accepted requests lost.

So ``RefusingProtocol`` asks the same question (``check``: the service's ``early_refusal``) as
soon as the headers are parsed, and when the answer is a refusal, writes it to the transport as
uvicorn would have (the same status line, default headers, headers and body, byte for byte) and
discards the request's body as uvicorn does for an answer sent before the body was read. It
takes only what cannot change the answer's bytes or order:

- nothing else in flight on the connection (a pipelined request waits its turn, as before);
- HTTP/1.1 keep-alive (a closing connection gets ``connection: close`` from uvicorn's path);
- no ``Expect: 100-continue``, no upgrade, no access log, no concurrency limit of uvicorn's;
- writes not paused (a client that does not read its answers gets uvicorn's path, which stops
  reading until it does, rather than a refusal buffered for each request it sends).

Everything else, and every request the check lets through, goes through uvicorn's own path
unchanged (the app checks admission once more). ``EDGEBENTO_PROTOCOL_REFUSAL=0`` turns it off.

Two more of uvicorn's costs per request are cut, with what a client sees unchanged: the scope is
built only for a request the check lets through (never for a refusal), and each connection keeps
one keep-alive timer armed instead of one made after each answer and freed as the next request
arrives (``_idle``). Measured on a socket with the check's answer given, the timer alone was a
quarter of a refusal's CPU (32 µs a refusal, 23 without it).

A request the check lets through may come with a ``Hold`` (a place kept for it in the model's
queue): it is put in the request's scope under ``HELD`` for the app to release as it admits the
request again, and released here as its answer completes or its connection closes, whichever
comes first (``release`` is idempotent), so no hold outlives its request.

Without the parser. What was left of a refusal's cost, after the above, was httptools' parse:
a call into Python for the message's start, its URL, each header, the end of its headers, its
body and its end. While the process is refusing (one of the last ``RECENT`` checks, on any
connection, answered a refusal), a packet that arrives with the connection between requests
(the parser not inside a message, nothing in flight or waiting, writes not paused, the other
conditions above) is first read by ``_refuse_whole``: each whole request at its start that
``refusal_fast_path.whole_request`` recognises (a strict grammar that llhttp parses the same
way, the same end, method, URL and headers: see that module) is checked with the same path and
headers as the parser's path gives the check, and a refusal is written and counted as above,
the next request read the same way. The first request it does not recognise or the check does
not refuse, and every byte after it, goes to the parser unchanged; a request the check let
through is not checked again: its answer (None, or its Hold) waits in ``checked`` for
``_refused``, and is released if the parser never reached that request's headers. A process
that is not refusing pays one comparison a packet (``_admitted_in_row``). Measured on a
loopback socket, server on one CPU, the check's answer given (``docs/serving.md``): 22.0 µs of
CPU a refusal with the parser, 14.4 without; an admitted request the same within the noise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from bentos.refusal_fast_path import path as url_path
from bentos.refusal_fast_path import whole_request

log = logging.getLogger(__name__)

# A refusal: its status, its header lines as uvicorn writes them (the server's default headers
# aside) ending with the blank line, and its body.
Refusal = tuple[int, bytes, bytes]


class Hold(Protocol):
    def release(self) -> None: ...


# (method, path, headers as uvicorn parsed them) -> the refusal; or None, or a Hold, to let the
# app answer.
Check = Callable[[str, str, list[tuple[bytes, bytes]]], Refusal | Hold | None]
HELD = "edgebento.held"  # the scope's key of a request's Hold

NAME = "bentos.protocol_refusal:RefusingProtocol"
CHECK: Check | None = None  # what ``install`` was given

# The checks answered since the last refusal, in all connections: under RECENT, the process is
# refusing, and a packet that arrives between requests is first read by ``_refuse_whole``.
RECENT = 8
_admitted_in_row = RECENT
_UNCHECKED: Any = object()  # no answer of the check waits for the parser's next request


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """``headers`` as uvicorn's ``RequestResponseCycle.send`` writes them on a keep-alive
    connection (names lower-cased), and the blank line after them."""
    return b"".join([name.lower() + b": " + value + b"\r\n" for name, value in headers]) + b"\r\n"


def response_bytes(
    status: int, head: bytes, body: bytes, defaults: list[tuple[bytes, bytes]]
) -> bytes:
    """What uvicorn writes for an answer whose header lines are ``head`` (``header_block``):
    the status line, the server's default headers (``date``), ``head`` and the body."""
    parts = [STATUS_LINE[status]]
    for name, value in defaults:
        parts += (name, b": ", value, b"\r\n")
    parts += (head, body)
    return b"".join(parts)


# The last refusal written and the default headers it was written with: under a flood the same
# refusal goes out many times a second, and uvicorn replaces its default headers (the date)
# once a second, with a new list. Held, not their ids: an id can be reused once freed.
_last: tuple[Refusal, list[tuple[bytes, bytes]], bytes] | None = None


def refusal_bytes(answer: Refusal, defaults: list[tuple[bytes, bytes]]) -> bytes:
    """``response_bytes`` of ``answer``, built again only when it or ``defaults`` changed."""
    global _last
    last = _last
    if last is not None and last[0] is answer and last[1] is defaults:
        return last[2]
    written = response_bytes(*answer, defaults)
    _last = (answer, defaults, written)
    return written


class RefusingProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.discarding = False  # the body of a request answered here is still arriving
        self.held: Hold | None = None  # the Hold of the last request the check let through
        self.admitted: Hold | None = None
        self.idle_since: float | None = None  # when its last answer completed, while idle
        self.between = True  # the parser is between messages, in HTTP, on a kept-alive connection
        self.left_http = False  # llhttp read an upgrade: what follows is not its to parse
        self.checked: Any = _UNCHECKED  # the check's answer for the parser's next request

    def data_received(self, data: bytes) -> None:
        if _admitted_in_row < RECENT and self.between:
            data = self._refuse_whole(data)
            if not data:
                return
            if self.checked is not _UNCHECKED:  # that request's answer, for ``_refused``
                try:
                    HttpToolsProtocol.data_received(self, data)
                finally:
                    self._drop_checked()
                return
        HttpToolsProtocol.data_received(self, data)

    def _refuse_whole(self, data: bytes) -> bytes:
        """Answer the refused requests at the start of ``data`` without parsing them (see the
        module's docstring); what is left, from the first request it does not answer, for the
        parser, unchanged."""
        global _admitted_in_row
        check, start = CHECK, 0
        while start < len(data) and check is not None and self._answers_alone():
            found = whole_request(data, start)
            if found is None:
                break
            end, _, path, headers = found
            answer = self._ask(check, path, headers)
            if not isinstance(answer, tuple):  # let through: the parser's, checked once
                _admitted_in_row += 1
                self.checked = answer
                break
            _admitted_in_row = 0
            self.transport.write(refusal_bytes(answer, self.server_state.default_headers))
            self.on_response_complete()
            start = end
        return data[start:] if start else data

    def _drop_checked(self) -> None:
        """An answer the parser did not take (its request did not reach its headers' end,
        which the grammar rules out): a Hold in it is released, never kept."""
        checked, self.checked = self.checked, _UNCHECKED
        if checked is not _UNCHECKED and checked is not None:
            checked.release()

    def on_message_begin(self) -> None:
        # uvicorn's, less the scope: it is built in ``on_headers_complete`` for a request the
        # check lets through, never for a refusal (under a flood, most requests).
        self.between = False
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.admitted = None  # this request's Hold, when the check gave one

    def on_headers_complete(self) -> None:
        if self._refused():
            return
        # A request in flight: the armed timer must find the connection busy, also when a
        # refusal answered in the same packet marked it idle before this request was parsed.
        self.idle_since = None
        # uvicorn's own start of the request, with what the parser has read since kept.
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.expect_100_continue = url, expect
        self.headers = self.scope["headers"] = headers
        if self.admitted is not None:
            self.scope[HELD] = self.admitted  # type: ignore[literal-required]
        super().on_headers_complete()

    def _answers_alone(self) -> bool:
        """Whether an answer written now would be the next on the connection, as uvicorn
        would write it: nothing in flight or waiting, no 100-continue, writes not paused, no
        access log or concurrency limit of uvicorn's, the connection open."""
        cycle = self.cycle
        return not (
            (cycle is not None and not cycle.response_complete)  # one in flight: in order
            or self.pipeline
            or self.expect_100_continue
            or self.flow.write_paused  # a client not reading its answers: uvicorn's path waits
            or self.access_log
            or self.limit_concurrency is not None
            or self.transport.is_closing()
        )

    def _refused(self) -> bool:
        checked = self.checked
        if checked is not _UNCHECKED:  # let through by ``_refuse_whole``: not asked again
            self.checked = _UNCHECKED
            if checked is not None:
                self.held = self.admitted = checked
            return False
        check = CHECK
        parser = self.parser
        if (
            check is None
            or not self._answers_alone()
            or parser.get_method() != b"POST"  # only an inference is refused from its headers
            or parser.get_http_version() != "1.1"
            or not parser.should_keep_alive()
            or parser.should_upgrade()
        ):
            return False
        path = url_path(self.url)
        if path is None:
            return False
        global _admitted_in_row
        answer = self._ask(check, path, self.headers)
        if not isinstance(answer, tuple):
            _admitted_in_row += 1
            if answer is not None:
                self.held = self.admitted = answer  # put in the request's scope as it is built
            return False
        _admitted_in_row = 0
        self.discarding = True
        self.transport.write(refusal_bytes(answer, self.server_state.default_headers))
        self.on_response_complete()  # counted, reading resumed, the keep-alive timer armed
        return True

    def _ask(self, check: Check, path: str, headers: list[tuple[bytes, bytes]]) -> Any:
        """``check``'s answer for a POST to ``path``; None (the app answers) where it fails."""
        try:
            return check("POST", self.root_path + path, headers)
        except Exception as exc:  # a bug of ours must not become the parser's 400: the app answers
            log.error("the early admission check failed: %s", exc, exc_info=exc)
            return None

    def on_response_complete(self) -> None:
        """uvicorn's, with its keep-alive timer armed lazily (``_idle``)."""
        self._release()
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle()

    # uvicorn arms a timer after each answer (an idle connection closes after
    # ``timeout_keep_alive``) and cancels it when the next request's bytes arrive: under a
    # flood, a timer made and freed per request, a quarter of a refusal's CPU. Here one timer
    # per connection stays armed: the bytes only mark the connection busy, and the timer, when
    # it fires, closes an idle connection at the same moment uvicorn's would have, or waits for
    # the rest of its idle time, or for the next answer to arm it again.
    def _idle(self) -> None:
        now = self.loop.time()
        self.idle_since = now
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_due
            )

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        if self.idle_since is None:  # busy: its answer arms the timer again
            return
        rest = self.idle_since + self.timeout_keep_alive - self.loop.time()
        if rest > 0:
            self.timeout_keep_alive_task = self.loop.call_later(rest, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()

    def _unset_keepalive_if_required(self) -> None:
        self.idle_since = None  # bytes arrived: the armed timer finds the connection busy

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self.idle_since = None
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        super().connection_lost(exc)

    def _release(self) -> None:
        """The last admitted request's Hold, if the app did not release it already (it is the
        only one: a request is checked only when none is in flight on the connection)."""
        held, self.held = self.held, None
        if held is not None:
            held.release()

    def on_body(self, body: bytes) -> None:
        if not self.discarding:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.discarding:
            self.discarding = False
            self.between = True  # a refusal's request: kept alive, in HTTP
            return
        parser = self.parser
        if parser.should_upgrade():
            self.left_http = True
        self.between = not self.left_http and parser.should_keep_alive()
        super().on_message_complete()


def install(check: Check) -> bool:
    """Make uvicorn's default HTTP protocol (``auto``, and ``httptools`` by name) a
    ``RefusingProtocol`` asking ``check``, for the servers configured from now on (BentoML's
    worker builds its ``uvicorn.Config`` after it loaded the service)."""
    from uvicorn import config

    global CHECK
    CHECK = check
    config.HTTP_PROTOCOLS["auto"] = config.HTTP_PROTOCOLS["httptools"] = NAME
    return True
