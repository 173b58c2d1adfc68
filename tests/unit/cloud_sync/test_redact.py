"""Passwords never shown: the URL parser's own notion of a password decides (issue 19, finding 10).

On main a regex cut URLs at ``'``, ``"``, ``<``, ``>`` and whitespace, characters ``urlsplit``
accepts in a password, so ``mqtt://fleetop:Sup'3r@host`` was printed whole."""

from __future__ import annotations

from urllib.parse import quote, unquote, urlsplit

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cloud_sync.mqtt import parse_broker_url
from cloud_sync.redact import redact_text, redact_url
from modelpack.errors import ConfigError

# What a URL cannot hold unencoded in its user-info part: '/', '?', '#' end the host part, and
# urlsplit refuses '[' and ']' outside an IPv6 address (see the last test).
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="/?#[]")


@settings(max_examples=300, deadline=None)
@given(password=st.text(PRINTABLE, min_size=1, max_size=40))
def test_a_password_of_any_printable_characters_is_redacted(password: str) -> None:
    url = f"mqtt://fleetop:{password}@broker.example:8883"
    assert urlsplit(url).password == password  # what the client would send
    assert redact_url(url) == "mqtt://fleetop:***@broker.example:8883"


@settings(max_examples=300, deadline=None)
@given(password=st.text(PRINTABLE, min_size=4, max_size=40))
def test_a_password_read_from_a_url_is_redacted_in_any_text_that_repeats_it(
    password: str,
) -> None:
    assume(len(unquote(password)) >= 4)  # shorter ones are redacted only inside URLs
    url = f"mqtt://fleetop:{password}@broker.example:1883"
    sent = parse_broker_url(url).password
    assert sent == unquote(password)
    line = f"cannot reach broker {url}: refused; retrying with {sent}"
    shown = redact_text(line)
    assert password not in shown and sent not in shown


@settings(max_examples=200, deadline=None)
@given(password=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1))
def test_a_percent_encoded_password_is_redacted(password: str) -> None:
    url = f"mqtts://op:{quote(password, safe='')}@h:8883/x?X-Amz-Signature=abc"
    assert redact_url(url) == "mqtts://op:***@h:8883/x?<redacted>"


def test_text_without_a_url_is_left_alone() -> None:
    assert redact_text("no secrets here") == "no secrets here"
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"


def test_a_url_the_parser_refuses_is_neither_shown_nor_used() -> None:
    url = "mqtt://op:pa[ss@h:1883"
    assert redact_url(url) == "<a URL that cannot be shown>"
    with pytest.raises(ConfigError, match="is not a URL"):
        parse_broker_url(url)
