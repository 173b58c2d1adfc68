"""Secrets out of anything that is shown: log lines, errors, status, telemetry, replies.

Two kinds travel in URLs: a password in the user-info part (``mqtt://user:pass@host``) and a
presigned query string (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``...).
The password becomes ``***``; a query string is dropped whole, since any of its parameters may
be a credential.
"""

from __future__ import annotations

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
