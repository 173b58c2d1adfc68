"""The enrollment service's CRL duties between enrollments: rewrite the CRL the broker reads
every ``refresh_s``, and check it on disk every ``check_s``.

Import path and API::

    from cloud_sync.crl_keeper import CrlKeeper
    keeper = CrlKeeper(ca, ids, crl_path, broker_pid, refresh_s=86400, check_s=60)
    keeper.start(first=False)   # the first write: ConfigError/StoreError are the caller's
    while serving:
        keeper.tick()           # never raises for a store, a CRL or a disk that fails: logs, retries

Why: the refresh keeps the CRL's nextUpdate ahead (past it OpenSSL refuses every client) and
folds in what a crash kept out of the index; the first one, at start, must work or the operator
must act (a new host: ``--first-crl``), so it is fatal. A later one that fails (the store
unreachable for a while) is not a reason to stop answering enrollments: it is logged and tried
again after ``check_s``.

The check: Mosquitto 2.0.11 runs with no CRL check after a SIGHUP (Debian's daily logrotate)
over a damaged CRL, until a good one and another SIGHUP. Reading the CRL is cheap (it is parsed
again only when its fstat changed, ``crl_disk.BrokerCrl``), so every ``check_s`` it is read,
and one that does not verify, or is older than the last good copy (a CRLNumber below it: an
older CRL the CA signed put back, ``crl_disk.behind_last_good``), is rewritten at once: the
writer puts the last good copy back and signals the broker (``crl_publish.publish_crl``),
within a minute rather than at the next refresh, up to a day later.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_sync.crl_disk import BrokerCrl
from cloud_sync.crl_publish import hang_up, publish_crl
from modelpack.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from cloud_sync.fleet_ca import FleetCA
    from cloud_sync.identity_store import IdentityStore

log = logging.getLogger(__name__)


class CrlKeeper:
    def __init__(
        self,
        ca: FleetCA,
        ids: IdentityStore,
        crl_path: Path,
        broker_pid: int | Path | None,
        refresh_s: float = 86400.0,
        check_s: float = 60.0,
    ) -> None:
        self.ca, self.ids, self.crl_path, self.broker_pid = ca, ids, crl_path, broker_pid
        self.refresh_s, self.check_s = refresh_s, check_s
        self.disk = BrokerCrl(ca, crl_path)
        self._refresh_at = self._check_at = 0.0

    def publish(self, records: bool = False) -> None:
        """Write the CRL and signal the broker (a rotation's, the refresh's with ``records``)."""
        publish_crl(self.ca, self.ids, self.crl_path, self.broker_pid, records=records)

    def start(self, first: bool = False) -> None:
        """The write at start, from the store and every signed record; ``first``: the fleet's
        first CRL on this host (none there yet), written before the broker is signalled (it
        may not run yet). Raises: the operator has to act."""
        if first:  # the ledger names every revoked device from this first write on
            publish_crl(self.ca, self.ids, self.crl_path, None, first=True, records=True)
            hang_up(self.broker_pid)
        else:
            self.publish(records=True)
        now = time.monotonic()
        self._refresh_at, self._check_at = now + self.refresh_s, now + self.check_s

    def tick(self) -> None:
        """The refresh or the check when due; a failure is logged, the service keeps serving."""
        now = time.monotonic()
        if now >= self._refresh_at:
            self._write(records=True, why="the CRL refresh")
        elif now >= self._check_at:
            self._check_at = now + self.check_s
            try:
                self.disk.read()  # logs an ERROR of its own when it does not verify
            except ConfigError:
                self._write(records=False, why="putting back the last good CRL")

    def _write(self, records: bool, why: str) -> None:
        wait = self.refresh_s
        try:
            self.publish(records=records)
        except (ConfigError, StoreError, OSError) as exc:  # OSError: the disk full, say
            log.error("%s failed (%s); the service keeps serving, tried again in %.0f s",
                      why, exc, self.check_s)  # fmt: skip
            wait = self.check_s
        now = time.monotonic()
        if records:
            self._refresh_at = now + wait
        self._check_at = now + self.check_s
