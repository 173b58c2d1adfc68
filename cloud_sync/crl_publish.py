"""Writing the CRL the broker reads, from the CRL on disk and the store's index, and a SIGHUP.

Import path and API::

    from cloud_sync.crl_publish import publish_crl, hang_up
    publish_crl(ca, ids, crl_path, broker_pid=1234)                 # write the CRL, SIGHUP
    publish_crl(ca, ids, crl_path, None, extra={serial: not_after}, devices={"cam-3": at})
    publish_crl(ca, ids, crl_path, pid, records=True)   # the service's refresh: records too

Each CRL lists what the CRL on disk lists (signed by this CA, ``cloud_sync.crl_disk``) until
each certificate's notAfter, the index's entries, and the revocation at hand (``extra``); and
it carries every revoked device the CRL on disk names, with ``devices``. Nothing the bucket
holds or lost takes an entry out before its certificate expires: the index only adds.

The index and the device records are written one after the other, so a crash (or a store that
fails) between the two leaves a retired certificate in a signed record and not in the index.
``records=True`` (the enrollment service's CRL write at its start and every ``--crl-refresh``)
folds every signed record's retired and revoked certificates, and its revoked devices, into
the index and the CRL: one read of every record, so not at each rotation.

A CRL on disk that cannot be read or is not the CA's is replaced by the writer's last good copy
first (``cloud_sync.crl_disk.read_for_writer``), and the broker is signalled even when the rest
of the write then fails (the store unreachable): a broker that reloaded the damaged file runs
without a CRL check until it reloads a good one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_sync.crl_disk import DiskCrl, crl_pem, one_writer, read_for_writer, write_crl
from cloud_sync.identity_crl import CRL_INDEX
from cloud_sync.identity_records import REPAIR, CrlEntry, RecordRefused
from modelpack.errors import ConfigError

if TYPE_CHECKING:
    from cloud_sync.fleet_ca import FleetCA
    from cloud_sync.identity_store import IdentityStore

log = logging.getLogger(__name__)


def broker_pid_of(broker: int | Path | None) -> int | None:
    """A pid, or the one in Mosquitto's ``pid_file`` now (a restarted broker has another)."""
    if not isinstance(broker, Path):
        return broker
    try:
        return int(broker.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--broker-pid-file {broker}: no broker pid in it ({exc})") from exc


def hang_up(broker_pid: int | Path | None) -> None:
    """SIGHUP the broker (a pid, or its pid file): it re-reads its configuration and CRL."""
    pid = broker_pid_of(broker_pid)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError as exc:
            raise ConfigError(f"no broker runs as pid {pid}") from exc


def _from_store(ids: IdentityStore, crl_path: Path, number: int) -> tuple[list[CrlEntry], int]:
    """The index's entries and its generation (the next CRL's number); while the index is
    refused (not the CA's, or below ``number``: put back), the signed records' entries and
    ``number`` + 1, so that the refused index never catches up."""
    try:
        index = ids.crl_index()
        if index.generation < number:
            ids.refused[("crl_index", "replayed")] += 1
            raise RecordRefused(
                CRL_INDEX,
                "replayed",
                f"{CRL_INDEX} is generation {index.generation}, below the number "
                f"{number} of the CRL {crl_path}: an older signed index put back",
            )
        return index.entries, index.generation
    except RecordRefused as exc:
        log.error(
            "%s; the CRL %s keeps every entry it lists, with those of the signed device "
            "records, until an operator rebuilds %s: %s",
            exc, crl_path, CRL_INDEX, REPAIR,
        )  # fmt: skip
        return ids.index_from_records().entries, number + 1


def publish_crl(
    ca: FleetCA,
    ids: IdentityStore,
    crl_path: Path,
    broker_pid: int | Path | None,
    extra: Mapping[int, float] | None = None,
    devices: Mapping[str, float] | None = None,
    first: bool = False,
    records: bool = False,
) -> int:
    """Write the CRL of every revoked or retired certificate (``extra``: serial -> notAfter,
    listed from now) and every revoked device (``devices``: device -> revocation time); SIGHUP
    the broker (a pid, or its pid file). The count of certificates listed.

    The index is signed by the CA (``cloud_sync.identity_records``); one that does not verify
    (edited, or an older release's), or whose generation is below the CRL's number (an older
    signed index put back, ``cloud_sync.crl_disk``), is not used: the signed device records
    stand in for it, the CRL's number goes up by one (so that index never catches up), and an
    ERROR names the index and the command that rebuilds it. With no CRL on disk nothing is
    written unless ``first`` (ConfigError): the store alone cannot show that its index is the
    latest; one that does not verify is first replaced by the last good copy (see the module's
    docstring). ``records``: fold the signed records in first (read while the CRL's lock is
    held, so a ``fleet revoke`` meanwhile waits for it)."""
    with one_writer(crl_path):
        disk, restored = read_for_writer(ca, crl_path, first)
        try:
            pem, listed = _next_crl(ca, ids, crl_path, disk, extra, devices, records)
            write_crl(crl_path, pem)
        except BaseException:
            if restored:  # the last good copy is back: the broker reloads it now
                with contextlib.suppress(ConfigError):
                    hang_up(broker_pid)
            raise
    hang_up(broker_pid)
    return listed


def _next_crl(
    ca: FleetCA,
    ids: IdentityStore,
    crl_path: Path,
    disk: DiskCrl,
    extra: Mapping[int, float] | None,
    devices: Mapping[str, float] | None,
    records: bool,
) -> tuple[bytes, int]:
    """The next CRL (signed PEM) from the CRL on disk, the store and the revocation at hand,
    and the count of certificates it lists."""
    named = dict(devices or {})
    if records:
        for device, at in ids.fold_records().items():
            named[device] = max(at, named.get(device, 0.0))
    now = time.time()
    revoked, known = dict(disk.entries), dict(disk.not_after)  # known: serial -> notAfter
    entries, number = _from_store(ids, crl_path, disk.number)
    for entry in entries:
        serial = int(entry.serial, 16)
        revoked[serial] = dt.datetime.fromtimestamp(entry.revoked_at, dt.UTC)
        known[serial] = max(entry.not_after, known.get(serial, 0.0))
    for serial, not_after in (extra or {}).items():  # the revocation at hand
        revoked.setdefault(serial, dt.datetime.fromtimestamp(now, dt.UTC))
        known[serial] = max(not_after, known.get(serial, 0.0))
    # Nothing says when it expires (a CRL from before the ledger): the longest it can last.
    unknown = ca.cert.not_valid_after_utc.timestamp()
    listed = {s: at for s, at in revoked.items() if known.get(s, unknown) > now}
    for device, at in disk.devices.items():
        named[device] = max(at, named.get(device, 0.0))
    until = {s: known[s] for s in listed if s in known}
    return crl_pem(ca, listed.items(), number, until, named), len(listed)
