"""HTTP/1.1 on the wire for the agent's local endpoint: a request head parsed strictly, and an
answer written out.

There is one way to know where a body ends, ``Content-Length`` given once: ``Transfer-Encoding``
(beside it or alone) and a repeated ``Content-Length`` are refused, so what the agent reads is
what a proxy in front of it reads (no request smuggled inside another's body).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from http import HTTPStatus

from modelpack.errors import InputError
from modelpack.serving.routes import HttpResponse

MAX_HEAD_BYTES = 32 << 10
MAX_HEADERS = 100
# RFC 9110's tchar: what a method or a header name may hold (no space before the colon).
_TOKEN = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
# A header value: visible characters, space and tab (no CR, LF, NUL or other controls).
_VALUE = frozenset(chr(c) for c in (*range(0x20, 0x7F), *range(0x80, 0x100))) | {"\t"}
_TARGET = frozenset(chr(c) for c in range(0x21, 0x7F))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True)
class RequestHead:
    method: str
    path: str  # without the query
    headers: dict[str, str]  # lower-case names
    length: int  # the body's bytes
    keep_alive: bool
    expect_continue: bool


def head_end(buffer: bytes | bytearray) -> int:
    """Where the head ends (after its blank line) in ``buffer``, or -1 while it is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


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


def parse_head(raw: bytes | bytearray, max_body: int) -> RequestHead:
    """A request head (its request line and headers, CRLF-separated, without the blank line)
    to a ``RequestHead``; InputError for anything HTTP/1.1 does not allow or we do not take."""
    text = bytes(raw).decode("latin-1")  # HTTP's own; what is not ASCII is checked below
    line, *fields = text.split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN:
        raise InputError(f"not an HTTP request line: {line[:80]!r}", reason="invalid")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise InputError(f"{version[:20]!r}: send HTTP/1.1", reason="invalid")
    if not target.startswith("/") or not set(target) <= _TARGET:
        raise InputError(f"the request target {target[:80]!r} is not a path", reason="invalid")
    if len(fields) > MAX_HEADERS:
        raise InputError(f"more than {MAX_HEADERS} headers", reason="invalid")
    headers: dict[str, str] = {}
    lengths: list[str] = []
    for field in fields:
        name, colon, value = field.partition(":")
        # No folded lines (a leading space) and no space before the colon: both are smuggling.
        if not colon or not name or not set(name) <= _TOKEN:
            raise InputError(f"a malformed header line: {field[:80]!r}", reason="invalid")
        if not set(value) <= _VALUE:
            raise InputError(f"header {name!r} holds a control character", reason="invalid")
        key, value = name.lower(), value.strip(" \t")
        if key == "content-length":
            lengths.append(value)
        # A repeated header is one list to HTTP (RFC 9110 5.3).
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "transfer-encoding" in headers:
        raise InputError(
            "Transfer-Encoding is not accepted here; send the body with a Content-Length",
            reason="invalid",
        )
    if len(lengths) > 1:
        raise InputError("Content-Length is given more than once", reason="invalid")
    # A GET has no body; only a POST must say how long its body is.
    raw_length = lengths[0] if lengths else ("0" if method != "POST" else None)
    length = content_length(raw_length, max_body)
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    # HTTP/1.0 closes after each answer (we send no Keep-Alive header to say otherwise).
    keep_alive = version == "HTTP/1.1" and "close" not in connection
    expect = headers.get("expect", "").lower() == "100-continue" and version == "HTTP/1.1"
    return RequestHead(method, target.split("?")[0], headers, length, keep_alive, expect)


def render(answer: HttpResponse, head_only: bool, close: bool) -> bytes:
    """The answer's bytes: status line, headers, and the body unless ``head_only`` (HEAD, whose
    Content-Length still says what a GET would get)."""
    try:
        phrase = HTTPStatus(answer.status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {answer.status} {phrase}"]
    lines += [f"{name}: {value}" for name, value in answer.headers.items()]
    lines.append(f"Content-Length: {len(answer.body)}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + answer.body
