"""The requests ``protocol_refusal`` may answer without feeding them to httptools.

Under a flood, what was left of a refusal's CPU after ``RefusingProtocol`` wrote it from the
headers was httptools' parse: llhttp in C, but a call into Python for the message's start, its
URL, each header, the end of its headers, its body and its end. A refused request needs none of
them: only its path and headers for the check, and where it ends, to read past its body.

Reading a request differently from llhttp would be a request-smuggling hole (a body taken for
a request, or a request for a body), so ``whole_request`` recognises only a small, strict
grammar, one compiled regular expression, that llhttp parses the same way (the same end, the
same method, URL and headers): ``POST``, an origin-form URL of RFC 3986 characters, ``HTTP/1.1``,
header lines ``token ":" OWS value OWS CRLF`` with visible ASCII values (no control
characters, no bare LF, no obs-fold, no obs-text), the blank line, and a body of exactly one
Content-Length of digits, all of it already read. No Transfer-Encoding, Expect, Upgrade or
Proxy-Connection, and a Connection header only as ``keep-alive``: the connection stays open and
in HTTP. Anything else is not recognised, and the protocol hands it, and every byte after it,
to httptools unchanged. ``tests/unit/bentos/test_refusal_fast_path.py`` checks the grammar
against llhttp on generated requests, valid and near-valid.

In the grammar no line is empty before the head's end, so a head is the bytes up to the first
blank line, and the same bytes always read the same: a flood's clients send a few heads over
and over, and a head recognised once is looked up, not read again (``_known``: at most
``_KNOWN_MAX`` heads, emptied when full). Reading a head of four headers costs about 2.5 µs
(more than llhttp's parse with uvicorn's callbacks); looking it up, about 0.7.

Only heads of at most ``_HEAD_MAX`` bytes and ``_HEADERS_MAX`` headers are in the grammar:
Python's regular expression reads a value at about 4 ns a byte, llhttp at about 0.6, so a
client's long heads read here would cost more than the parse they skip (an 8 KB header: 95 µs
a refusal against 43 through the parser), and the headers kept per known head stay few (the
cache holds under 2 MB). Longer heads go to llhttp unread.
"""

from __future__ import annotations

import re

import httptools

from modelpack.serving.kept import keep

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]++"
_PCHARS = rb"\-A-Za-z0-9._~!$&'()*+,;=:@/%"
# A header's value with the OWS around it: visible ASCII, spaces and tabs. Possessive: no part
# can end where the next starts, so a failed match backtracks nothing.
_HEAD = re.compile(
    rb"POST (/[" + _PCHARS + rb"]*+(?:\?[" + _PCHARS + rb"?]*+)?) HTTP/1\.1\r\n"
    rb"((?:" + _TOKEN + rb":[!-~ \t]*+\r\n)*+)\r\n"
)
# The headers that change where a message ends or whether the connection stays in HTTP (llhttp
# reads Proxy-Connection as Connection), and Expect (uvicorn answers 100-continue).
_SPECIAL = frozenset(
    b"content-length transfer-encoding connection proxy-connection upgrade expect".split()
)
_MAX_LENGTH_DIGITS = 12

# A request's head (its bytes up to the blank line) -> its URL, path, headers, body length.
# A flood's clients send a few heads over and over: one recognised is not read again.
Head = tuple[bytes, str, list[tuple[bytes, bytes]], int]
_known: dict[bytes, Head] = {}
_KNOWN_MAX = 256
_HEAD_MAX = 2048  # bytes of a head in the grammar, its blank line included
_HEADERS_MAX = 32  # headers of a head in the grammar

Request = tuple[int, bytes, str, list[tuple[bytes, bytes]]]


def whole_request(data: bytes, start: int) -> Request | None:
    """The request at ``data[start:]``, when it is in the grammar above and all of it is in
    ``data``: where it ends, its URL, its path as uvicorn gives it to the app (``path``), and
    its headers as uvicorn lists them (names lower-cased, values without the OWS around them).
    None for anything else."""
    # In the grammar, no line is empty before the head's end: it ends at the first blank line.
    head_end = data.find(b"\r\n\r\n", start, start + _HEAD_MAX) + 4
    if head_end < 4:
        return None
    head = data[start:head_end]
    known = _known.get(head)
    if known is None:
        known = _read(head)
        if known is None:
            return None
        keep(_known, head, known, _KNOWN_MAX)
    url, found, headers, length = known
    end = head_end + length
    if end > len(data):
        return None
    return end, url, found, headers.copy()


def _read(head: bytes) -> Head | None:
    matched = _HEAD.fullmatch(head)
    if matched is None or matched[2].count(b"\n") > _HEADERS_MAX:
        return None
    found = path(matched[1])
    if found is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    for line in matched[2].split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        name, value = name.lower(), value.strip(b" \t")
        headers.append((name, value))
        if name in _SPECIAL:
            if name == b"content-length":
                if length >= 0 or not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
                    return None
                length = int(value)
            elif name != b"connection" or value.lower() != b"keep-alive":
                return None
    if length < 0:
        return None
    return matched[1], found, headers, length


def path(url: bytes) -> str | None:
    """The path as uvicorn puts it in the scope (percent-decoded); None where it would not
    parse it the same way (then uvicorn's own path answers)."""
    try:
        raw = httptools.parse_url(url).path.decode("ascii")
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        return None
    if "%" in raw:
        from urllib.parse import unquote

        raw = unquote(raw)
    return raw
