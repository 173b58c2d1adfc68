"""A broker URL's port, checked before anything connects.

Import path and API::

    from cloud_sync.broker_url import check_broker_port
    check_broker_port("mqtt://host:99999", "--broker")   # ConfigError naming the flag

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
