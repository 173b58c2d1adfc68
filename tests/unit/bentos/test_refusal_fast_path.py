"""``whole_request`` against llhttp (httptools, with uvicorn's leniency): any request it
recognises, llhttp parses the same way: the same end, method, URL, headers as uvicorn lists
them, body, a kept-alive HTTP/1.1 connection; and the next request after it starts where it
says. Requests are generated valid and near-valid, where a server that read them differently
from llhttp would let a request be smuggled."""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass, field

import httptools
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bentos import refusal_fast_path
from bentos.refusal_fast_path import path as url_path
from bentos.refusal_fast_path import whole_request


@dataclass
class Message:
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    method: bytes = b""
    version: str = ""
    keep_alive: bool = False
    upgrade: bool = False
    complete: bool = False


class Parsed:
    """What uvicorn's ``HttpToolsProtocol`` takes from llhttp's callbacks, per message."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.error: Exception | None = None

    def feed(self, data: bytes) -> Parsed:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.error = exc
        return self

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        message = self.messages[-1]
        message.method = self.parser.get_method()
        message.version = self.parser.get_http_version()
        message.keep_alive = self.parser.should_keep_alive()
        message.upgrade = self.parser.should_upgrade()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True


def assert_llhttp_agrees(data: bytes) -> bool:
    """If ``whole_request`` recognises the request at the start of ``data``, llhttp reads the
    same request, ending at the same byte. Whether it recognised one."""
    found = whole_request(data, 0)
    if found is None:
        return False
    end, url, path, headers = found
    assert path == url_path(url) is not None
    assert whole_request(data, 0) == found  # its head known now: the same
    whole = Parsed().feed(data[:end])
    assert whole.error is None
    (message,) = whole.messages
    assert message.complete
    assert (message.method, message.url, message.headers) == (b"POST", url, headers)
    assert (message.version, message.keep_alive, message.upgrade) == ("1.1", True, False)
    length = int(dict(headers)[b"content-length"])
    assert message.body == data[end - length : end]
    short = Parsed().feed(data[: end - 1])  # one byte less: not complete
    assert short.error is None and not any(m.complete for m in short.messages)
    # The next request starts at ``end``: llhttp reads it as a message of its own.
    after = Parsed().feed(data[:end] + b"GET /next HTTP/1.1\r\n\r\n")
    assert after.error is None and [m.url for m in after.messages] == [url, b"/next"]
    assert all(m.complete for m in after.messages)
    return True


# Each request is valid, or has one or two kinds of part drawn near-valid where they occur.
TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789ABCDEFabcdefXYZxyz", min_size=1, max_size=8)
VISIBLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.just("\t"))
NEAR_NAME = st.sampled_from(
    [
        *(
            [
                "Content-Length",
                "content-length",
                "CONTENT-LENGTH",
                "Transfer-Encoding",
                "Connection",
            ]
        ),
        *(["Proxy-Connection", "Upgrade", "Expect", "Host", "Te", "Content_Length", "Keep-Alive"]),
        *(
            "Content-Length ",
            " Host",
            "Content-Length\t",
            "Con\x00tent-Length",
            "Content-Length\xe9",
        ),
    ]
)
NEAR_VALUE = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=10),
    st.sampled_from(
        [
            *(
                [
                    "keep-alive",
                    "close",
                    "Keep-Alive",
                    "upgrade",
                    "chunked",
                    "gzip",
                    "100-continue",
                    "websocket",
                ]
            ),
            *(["5", "05", "+5", "-1", "5,5", "0x5", "1e1", "99999999999999999999", "0"]),
            *("keep-alive, close", "5 ", " 5", "\t5\t", "5\r\n 6", "\x00", "a\rb", "a\nb"),
            *("x\r\n\tcont", "x\xe9", "\x7f"),
        ]
    ),
)
NEAR_EOL = st.sampled_from(["\r\n", "\n", "\r", "\r\r\n", "\n\r", "\r\n ", "\r\n\t"])
NEAR_SEPARATOR = st.sampled_from([":", ": ", ":\t", ":  ", " :", "\t:", "::", ""])
URL = st.text(alphabet="/abcXYZ019-._~!$&'()*+,;=:@%?", max_size=12).map(lambda url: "/" + url)
NEAR_URL = st.one_of(
    st.tuples(URL, st.sampled_from('#\t \x00\x7f\xe9\\"<>{}|^`[]\r\n'), URL).map(
        lambda parts: parts[0] + parts[1] + parts[2][1:]
    ),
    st.sampled_from(["http://x/predict", "*", "x", "//x", "", "/%zz", "/%00", "/a%2Fb"]),
)
NEAR_LINE = st.sampled_from(
    [
        *(method + " /p HTTP/1.1" for method in ["post", "PUT", "GET", "PATCH", "POS", "POSTT"]),
        *("POST  /p HTTP/1.1", "POST /p HTTP/1.1 ", "POST /p HTTP/1.0", "POST /p HTTP/2.0"),
        *("POST /p http/1.1", "POST /p HTTP/1.10", "POST /p HTTP/1.1\x00", "POST\t/p HTTP/1.1"),
    ]
)
FLAWS = ["line", "url", "eol", "name", "separator", "value", "length", "body", "special"]
# The headers llhttp or uvicorn read for framing, keep-alive or upgrade, with what they take.
SPECIAL = st.tuples(
    st.sampled_from(["Content-Length", "Transfer-Encoding", "Connection", "Proxy-Connection"])
    | st.sampled_from(["Upgrade", "Expect", "CONNECTION", "transfer-encoding"]),
    st.sampled_from(["close", "keep-alive", "Keep-Alive", "upgrade", "chunked", "100-continue"])
    | st.sampled_from(["keep-alive, close", "keep-alive, upgrade", "0", "websocket", "identity"]),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    flaws = draw(st.sets(st.sampled_from(FLAWS), max_size=2))

    def drawn(
        kind: str, valid: st.SearchStrategy[str], near: st.SearchStrategy[str]
    ) -> st.SearchStrategy[str]:
        return st.one_of(valid, near) if kind in flaws else valid

    def part(kind: str, valid: st.SearchStrategy[str], near: st.SearchStrategy[str]) -> str:
        return draw(drawn(kind, valid, near))

    line = part("url", URL, NEAR_URL).join(["POST ", " HTTP/1.1"])
    if "line" in flaws:
        line = draw(NEAR_LINE)
    lines = [line]
    body = draw(st.binary(max_size=12))
    names = draw(st.lists(drawn("name", TOKEN, NEAR_NAME), max_size=4))
    length = part("length", st.just(str(len(body))), NEAR_VALUE)
    place = draw(st.integers(0, len(names)))
    if "length" not in flaws or draw(st.booleans()):
        names.insert(place, "Content-Length")
    values = [
        length if i == place else part("value", VISIBLE, NEAR_VALUE) for i in range(len(names))
    ]
    if "special" in flaws:
        at = draw(st.integers(0, len(names)))
        name, value = draw(SPECIAL)
        names.insert(at, name)
        values.insert(at, value)
    for name, value in zip(names, values, strict=True):
        lines.append(name + part("separator", st.just(": "), NEAR_SEPARATOR) + value)
    head = "".join(text + part("eol", st.just("\r\n"), NEAR_EOL) for text in lines)
    head += part("eol", st.just("\r\n"), NEAR_EOL)
    sent = len(body) if "body" not in flaws else draw(st.integers(0, len(body)))
    return head.encode("latin-1") + body[:sent]


@settings(max_examples=3000)
@given(requests(), st.binary(max_size=8))
@example(b"POST /predict HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", b"")
def test_what_it_recognises_llhttp_reads_the_same_way(request: bytes, after: bytes) -> None:
    assert_llhttp_agrees(request + after)


VALID = b"POST /v2/x%20y?q=1 HTTP/1.1\r\nHost: a\r\nX-T:\t 3 \t\r\nContent-Length: 2\r\n\r\n{}"


def test_a_plain_request_is_recognised_with_uvicorns_headers() -> None:
    assert assert_llhttp_agrees(VALID + b"POST")
    found = whole_request(b"xx" + VALID, 2)
    assert found == (
        len(VALID) + 2,
        b"/v2/x%20y?q=1",
        "/v2/x y",
        [(b"host", b"a"), (b"x-t", b"3"), (b"content-length", b"2")],
    )
    assert whole_request(VALID.replace(b"Host: a", b"Connection: Keep-Alive"), 0) is not None


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"Content-Length: 2\r\n", b"Content-Length: 2\r\nContent-Length: 2\r\n"),  # duplicate
        (b"Content-Length: 2\r\n", b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n"),
        (b"Content-Length: 2\r\n", b""),  # no length
        (b"Content-Length: 2", b"Content-Length: +2"),
        (b"Content-Length: 2", b"Content-Length: 1234567890123"),
        (b"Host: a\r\n", b"Host: a\n"),  # bare LF
        (b"Host: a\r\n", b"Host: a\r\n b\r\n"),  # obs-fold
        (b"Host: a", b"Host : a"),  # space before the colon
        (b"Host: a", b"Host: a\x00b"),  # NUL
        (b"Host: a", b"Host: a\x7f"),
        (b"Host: a", b"Host: \xe9"),  # obs-text: llhttp's to read
        (b"POST /v2", b"POST http://h/v2"),  # absolute form
        (b"POST", b"post"),
        (b"HTTP/1.1", b"HTTP/1.0"),
        (b"Host: a", b"Connection: close"),
        (b"Host: a", b"Connection: keep-alive, Upgrade"),
        (b"Host: a", b"Proxy-Connection: close"),
        (b"Host: a", b"Upgrade: websocket"),
        (b"Host: a", b"Expect: 100-continue"),
        (b"\r\n{}", b"\r\n{"),  # the body not all read
    ],
)
def test_near_valid_requests_are_left_to_llhttp(old: bytes, new: bytes) -> None:
    assert whole_request(VALID.replace(old, new, 1), 0) is None


def test_a_known_head_is_still_a_whole_request_only_with_its_body() -> None:
    """A head read before is not parsed again, but its body must still be all there, and the
    headers given out are a copy each time."""
    first = whole_request(VALID, 0)
    assert first is not None
    assert whole_request(VALID[:-1], 0) is None
    again = whole_request(VALID + VALID, len(VALID))
    assert again is not None and again[0] == 2 * len(VALID)
    assert again[3] == first[3] and again[3] is not first[3]


def _head_of(size: int) -> bytes:
    """VALID with its Host header grown to make a head of ``size`` bytes."""
    head = VALID.index(b"\r\n\r\n") + 4
    return VALID.replace(b"Host: a", b"Host: " + b"a" * (1 + size - head))


def test_long_heads_are_left_to_llhttp_unread() -> None:
    """A head over _HEAD_MAX bytes or _HEADERS_MAX headers is not in the grammar: read by a
    regular expression it would cost more than llhttp's parse (the CPU a flood's refusals
    save), and the cache would keep its headers. Found by review 102: a 60 KB head was read."""
    limit = refusal_fast_path._HEAD_MAX
    assert whole_request(_head_of(limit), 0) is not None
    assert whole_request(_head_of(limit + 1), 0) is None
    assert whole_request(VALID.replace(b"Host: a", b"Host: " + b"a" * 60_000), 0) is None
    many = b"".join(b"x%d: 1\r\n" % i for i in range(5000))
    assert whole_request(VALID.replace(b"Host: a\r\n", many), 0) is None
    # VALID has two headers besides Host: Host and _HEADERS_MAX - 2 more fit, one more does not.
    fits = b"".join(b"x%d: 1\r\n" % i for i in range(refusal_fast_path._HEADERS_MAX - 3))
    assert whole_request(VALID.replace(b"Host: a\r\n", b"Host: a\r\n" + fits), 0) is not None
    over = fits + b"y: 1\r\n"
    assert whole_request(VALID.replace(b"Host: a\r\n", b"Host: a\r\n" + over), 0) is None


def test_what_is_kept_stays_bounded() -> None:
    """At most _KNOWN_MAX heads, each of at most _HEAD_MAX bytes and _HEADERS_MAX headers:
    under 2 MB however a client shapes them (review 102 measured 10.6 MB with 395 headers a
    head)."""
    refusal_fast_path._known.clear()
    names = b"".join(
        b"%c%c:\r\n" % (97 + j % 26, 97 + j // 26 % 26)
        for j in range(refusal_fast_path._HEADERS_MAX - 1)
    )
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(2 * refusal_fast_path._KNOWN_MAX):
            request = b"POST /%d HTTP/1.1\r\n%sContent-Length: 0\r\n\r\n" % (index, names)
            assert whole_request(request, 0) is not None
            assert len(refusal_fast_path._known) <= refusal_fast_path._KNOWN_MAX
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        refusal_fast_path._known.clear()
    assert kept < 2_000_000
