"""The agent endpoint's request heads, parsed strictly: any bytes give a head or a 4xx reason,
never another exception, and a well-formed head is read back as it was written."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.http_wire import parse_head
from modelpack.errors import InputError
from modelpack.serving.reasons import status_of

CAP = 4096
TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
names = st.text(TOKEN, min_size=1, max_size=20).filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding", "connection", "expect")
)
values = st.text(string.ascii_letters + string.digits + " ;=/,.-", max_size=40).map(str.strip)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_head_or_a_4xx(raw: bytes) -> None:
    try:
        head = parse_head(raw, CAP)
    except InputError as exc:
        assert 400 <= status_of(exc) < 500
    else:
        assert 0 <= head.length <= CAP and head.path.startswith("/")


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT"]),
    path=st.text(string.ascii_letters + string.digits + "/-_.", max_size=30).map(lambda p: "/" + p),
    headers=st.dictionaries(names, values, max_size=8),
    length=st.integers(0, CAP),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0"]),
)
def test_a_well_formed_head_is_read_back(
    method: str, path: str, headers: dict[str, str], length: int, version: str
) -> None:
    unique = {k.lower(): v for k, v in headers.items()}
    lines = [f"{method} {path}?q=1 {version}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in unique.items()]
    head = parse_head("\r\n".join(lines).encode(), CAP)
    assert (head.method, head.path, head.length) == (method, path, length)
    assert {k: head.headers[k] for k in unique} == unique
    assert head.keep_alive is (version == "HTTP/1.1")


@given(st.sampled_from(["Transfer-Encoding: chunked", "Content-Length: 3", "transfer-encoding: x"]))
def test_a_second_way_to_end_the_body_is_refused(second: str) -> None:
    raw = f"POST /infer HTTP/1.1\r\nContent-Length: 3\r\n{second}".encode()
    try:
        parse_head(raw, CAP)
    except InputError as exc:
        assert status_of(exc) == 400 and exc.reason == "invalid"
    else:
        raise AssertionError("accepted")
