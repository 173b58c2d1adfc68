"""Secrets out of anything that is shown: log lines, errors, status, telemetry, replies.

Two kinds travel in URLs: a password in the user-info part (``mqtt://user:pass@host``) and a
presigned query string (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``...).
The password becomes ``***``; a query string is dropped whole, since any of its parameters may
be a credential.

A URL given as one value (a ``--broker`` flag, a store URL) is redacted with the URL parser's own
notion of its parts, the same ``urlsplit`` that reads the password to use: a password holding
quotes, ``<``, ``>`` or spaces is still a password. Every password seen that way is remembered
(a few, per process), so a log line or error text that repeats it verbatim is redacted too; in
free text with no such memory, URLs are found by pattern.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_REMEMBERED = 32
_MIN_REMEMBERED = 4
_secrets: dict[str, None] = {}  # insertion-ordered: the oldest is forgotten first


def remember_password(password: str) -> None:
    """Redact ``password`` wherever it appears in text from now on (one too short to be told
    from ordinary words is redacted only where it stands in a URL)."""
    if len(password) < _MIN_REMEMBERED:
        return
    for form in {password, quote(password, safe="")}:
        _secrets.pop(form, None)
        _secrets[form] = None
    while len(_secrets) > _MAX_REMEMBERED:
        del _secrets[next(iter(_secrets))]


def redact_url(url: str) -> str:
    """``url`` without its password and query string, its parts as ``urlsplit`` reads them."""
    if not _SCHEME.match(url):
        return redact_text(url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, colon, password = userinfo.partition(":")
            if password:
                remember_password(password)
                remember_password(unquote(password))
            netloc = f"{user}:***@{host}" if colon else f"{user}@{host}"
        query = "<redacted>" if parts.query else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "<a URL that cannot be shown>"


def redact_text(text: str) -> str:
    """Every URL in ``text`` redacted, and every password seen in a URL before."""
    for secret in list(_secrets):
        if secret and secret in text:
            text = text.replace(secret, "***")
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


class RedactingFilter(logging.Filter):
    """Redacts every log record's message before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            # The traceback's last line repeats the exception's text: keep the text redacted.
            exc = record.exc_info[1]
            text = str(exc)
            if redact_text(text) != text:
                record.exc_info = None
                record.msg = f"{record.msg} ({type(exc).__name__}: {redact_text(text)})"
        return True


def install_log_redaction() -> None:
    """Add the filter to every handler of the root logger (call after logging is set up)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
