"""Secrets out of anything that is shown: log lines, errors, status, telemetry, replies.

Two kinds travel in URLs: a password in the user-info part (``mqtt://user:pass@host``) and a
presigned query string (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``...).
The password becomes ``***``; a query string is dropped whole, since any of its parameters may
be a credential.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` without its password and query string; text that is not a URL is searched for
    URLs, each redacted."""
    if "://" not in url:
        return url
    if not _URL.fullmatch(url):
        return redact_text(url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
        query = "<redacted>" if parts.query else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "<a URL that cannot be shown>"


def redact_text(text: str) -> str:
    """Every URL in ``text`` redacted."""
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
