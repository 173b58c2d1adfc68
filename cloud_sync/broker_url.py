"""A broker URL's port, checked before anything connects.

Import path and API::

    from cloud_sync.broker_url import check_broker_port, check_listen_port
    check_broker_port("mqtt://host:99999", "--broker")   # ConfigError naming the flag
    check_listen_port(99999, "--metrics-port")           # likewise, before any work is done

``urlsplit`` takes ``mqtt://host:99999`` and ``mqtt://host:0`` for URLs; the first fails only
when the port is read, the second when the connection is tried (an agent given either ran and
never connected). Both are refused at start with one line naming the flag.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from cloud_sync.redact import redact_url
from modelpack.errors import ConfigError


def check_broker_port(url: str, flag: str) -> None:
    try:
        port = urlsplit(url).port
    except ValueError as exc:
        raise ConfigError(f"{flag} {redact_url(url)}: the port is not 1-65535 ({exc})") from exc
    if port == 0:
        raise ConfigError(f"{flag} {redact_url(url)}: port 0 is not a broker's port (1-65535)")


def check_listen_port(port: int | None, flag: str) -> None:
    """A port this process will listen on (None or 0: none): one that cannot be bound was an
    OverflowError from deep in the command, after it had done its work (monitor wrote its
    report first)."""
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"{flag} {port}: is not a port (1-65535)")
