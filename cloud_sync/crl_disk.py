"""The CRL on disk, the one the broker reads: what it lists and until when, which devices were
revoked and when, its CRLNumber, one writer at a time.

Import path and API::

    from cloud_sync.crl_disk import BrokerCrl, crl_pem, one_writer, read_disk_crl, write_crl
    from cloud_sync.crl_disk import broker_crl, read_for_writer
    with one_writer(crl_path):
        disk, restored = read_for_writer(ca, crl_path)    # the last good copy put back if need be
        disk.entries, disk.number, disk.not_after, disk.devices
        write_crl(crl_path, crl_pem(ca, entries, number, not_after, devices))  # and its copy
    read_disk_crl(ca, crl_path)         # ConfigError when there is none, or it does not verify
    BrokerCrl(ca, crl_path).read()      # the same, read again only when the file changed
    broker_crl(ca, crl_path)            # fleet broker-config: the CA's CRL where there is none

Why: the CRL is signed by the fleet CA and lives outside the bucket, so it is what the CRL
writer trusts when the store's index may have been put back. The index carries a signed,
always-increasing ``generation`` and each CRL written carries the generation it was written
from as its CRLNumber (RFC 5280 5.2.3): an index whose generation is below the number of the
CRL on disk is an older one put back (``cloud_sync.crl_publish.publish_crl`` refuses it). With
no CRL on disk (a new host, a lost file) nothing says which index is the latest, so the writer
does not write one from the store alone unless told that this is the first (``first``).

An X.509 CRL entry holds a serial and a date, not when the certificate expires, nor whose it
was. So each CRL also carries a ledger, in one non-critical extension of its own
(``cloud_sync.crl_ledger``: a UUID-based OID that OpenSSL and Mosquitto ignore), signed by the
CA with the rest:

- ``not_after``: each listed certificate's notAfter. An entry stays listed until then, whatever
  the bucket's index says or lost (an entry of a CRL from before the ledger is kept until the
  issuing certificate expires: nothing local says when its certificate does);
- ``devices``: each revoked device and the time of its last revocation, kept for the life of
  the issuing key. A claim issued before it is refused, and so is a record that says the
  device is not revoked but names no certificate issued after it (an older record put back),
  whatever the bucket holds or lost (``cloud_sync.identity_store``, ``identity_claims``).

The file is read once and everything (entries, CRLNumber, ledger) is taken from the one object
whose signature was checked: whoever can replace the file between two reads would otherwise
have the second one's ledger signed into the next CRL by the writer.

Mosquitto 2.0.11 refuses to start on a CRL it cannot load, but on a SIGHUP (every CRL write,
and Debian's daily logrotate of mosquitto.log) over a truncated, empty, garbled or missing CRL
it logs "Unable to load certificate revocation file" and runs on **without a CRL check**: every
revoked certificate connects again, until a good CRL and another SIGHUP (over another CA's CRL
it refuses every client).
So each write also keeps a last good copy beside the CRL (``crl.pem.last-good``, fsynced, only
ever what this writer signed), and a writer that finds the CRL on disk unreadable or not the
CA's, or older than that copy (a CRLNumber below the copy's: an older CRL the CA signed put
back, from a backup, a snapshot, a local swap, lacking what was revoked since), puts that copy
back (checked against the CA first), with an ERROR and a count (``RESTORES``), before it writes
and signals the broker. ``BrokerCrl`` refuses such an older CRL too, so the enrollment
service's check (``cloud_sync.crl_keeper``) puts the copy back within ``--crl-check``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_sync.crl_ledger import ledger_extension, read_ledger
from cloud_sync.pem_files import write_public
from cloud_sync.spent_claims import SpentClaims, spent_path
from modelpack.errors import ConfigError, clip

if TYPE_CHECKING:
    from cloud_sync.fleet_ca import FleetCA

log = logging.getLogger(__name__)
# CRL path -> how many times this process put its last good copy back (a metric's source).
RESTORES: Counter[str] = Counter()


@dataclass(frozen=True)
class DiskCrl:
    entries: dict[int, dt.datetime] = field(default_factory=dict)  # serial: revocation date
    number: int = 0  # its CRLNumber: the index generation it was written from (0: none)
    not_after: dict[int, float] = field(default_factory=dict)  # serial: its notAfter, if known
    devices: dict[str, float] = field(default_factory=dict)  # revoked device: when (last)

    @cached_property
    def serials(self) -> frozenset[str]:
        """The listed serials, in hex as records name them."""
        return frozenset(format(s, "x") for s in self.entries)


def crl_pem(
    ca: FleetCA,
    entries: Iterable[tuple[int, dt.datetime]],
    number: int,
    not_after: Mapping[int, float],
    devices: Mapping[str, float],
) -> bytes:
    """The CRL with its ledger, signed by the CA."""
    return ca.crl(sorted(entries), number=number, extensions=[ledger_extension(not_after, devices)])


def parse_crl(ca: FleetCA, data: bytes, what: object = "the CRL") -> DiskCrl:
    """ConfigError unless the CA signed the CRL in ``data`` and it reads whole; everything is
    taken from the object whose signature was checked."""
    from cryptography import x509

    crl = ca.checked_crl(data, what)
    try:
        entries = {r.serial_number: r.revocation_date_utc for r in crl}
        found = crl.extensions.get_extension_for_class(x509.CRLNumber)
        number = int(found.value.crl_number)
    except x509.ExtensionNotFound:
        number = 0
    except ValueError as exc:  # an entry or an extension that does not parse
        raise ConfigError(f"{what} cannot be read ({clip(str(exc))})") from exc
    until, devices = read_ledger(crl)
    return DiskCrl(entries, number, until, devices)


def _read(ca: FleetCA, crl_path: Path) -> DiskCrl:
    try:
        data = crl_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{crl_path}: no CRL to read ({exc.strerror or exc})") from exc
    return parse_crl(ca, data, crl_path)


def _none(crl_path: Path, first: bool, why: str) -> DiskCrl:
    if not first:
        raise ConfigError(
            f"{why}: not writing a CRL from the store alone, which may be an older one put "
            "back; restore the broker's CRL, or pass --first-crl if this is the fleet's first "
            "CRL on this host"
        )
    if crl_path.exists():
        log.error("%s: the first CRL is written from the store alone", why)
    return DiskCrl()


def read_disk_crl(ca: FleetCA, crl_path: Path, first: bool = False) -> DiskCrl:
    """The CRL at ``crl_path``, checked against the CA. None there, unreadable or another
    issuer's: ConfigError, unless ``first`` (the fleet's first CRL on this host), when it reads
    as empty (an ERROR if a file was there)."""
    try:
        return _read(ca, crl_path)
    except ConfigError as exc:
        return _none(crl_path, first, str(exc))


def last_good(crl_path: Path) -> Path:
    """Where the writers keep a copy of the last CRL they wrote (see the module's docstring)."""
    return crl_path.with_name(f"{crl_path.name}.last-good")


def write_crl(crl_path: Path, pem: bytes) -> None:
    """The CRL, then its last good copy, each fsynced and renamed into place (``write_public``).
    A crash between the two leaves the copy one write behind, never ahead of the CRL. The first
    write on a host (no copy yet) makes the empty list of spent claims beside them before
    either: from then on that list missing is a ConfigError (``spent_claims``)."""
    if not last_good(crl_path).exists():
        SpentClaims(spent_path(crl_path)).create()
    write_public(crl_path, pem)
    write_public(last_good(crl_path), pem)


def broker_crl(ca: FleetCA, crl_path: Path) -> DiskCrl | None:
    """A broker's CRL where there is none: the CA's, and its last good copy (None). One there
    is the live CRL, its ledger with it: kept if it verifies (returned), ConfigError if not."""
    if not crl_path.exists():
        write_crl(crl_path, ca.paths.crl.read_bytes())
        return None
    try:
        return _read(ca, crl_path)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}: left as it is; the next CRL write (enroll-service, fleet revoke) puts its "
            f"last good copy {last_good(crl_path).name} back, or move it away on a new host"
        ) from exc


def behind_last_good(ca: FleetCA, crl_path: Path, disk: DiskCrl) -> None:
    """ConfigError when ``disk`` (read from ``crl_path``) has a CRLNumber below that of the
    last good copy: an older CRL the CA signed put back (a backup or snapshot restored, a local
    swap) lacks what was revoked since, and the broker would let those certificates in at its
    next SIGHUP. A copy that is missing or does not verify says nothing (the CRL stands)."""
    try:
        kept = parse_crl(ca, last_good(crl_path).read_bytes(), last_good(crl_path)).number
    except (OSError, ConfigError):
        return
    if disk.number < kept:
        raise ConfigError(
            f"{crl_path}: CRLNumber {disk.number} is below the last good copy's {kept} "
            "(an older CRL put back)"
        )


def read_for_writer(ca: FleetCA, crl_path: Path, first: bool = False) -> tuple[DiskCrl, bool]:
    """For a writer, under ``one_writer``: the CRL on disk, and whether it was put back. One
    that cannot be read, is not the CA's or is older than the last good copy
    (``behind_last_good``) is replaced by that copy, if it is the CA's (an ERROR, counted in
    ``RESTORES``); without one, as ``read_disk_crl``."""
    try:
        disk = _read(ca, crl_path)
        behind_last_good(ca, crl_path, disk)
        return disk, False
    except ConfigError as exc:
        damaged = str(exc)
    keep = last_good(crl_path)
    try:
        data = keep.read_bytes()
        disk = parse_crl(ca, data, keep)
    except OSError as exc:
        return _none(crl_path, first, f"{damaged} (no last good copy: {exc.strerror})"), False
    except ConfigError as exc:
        return _none(crl_path, first, f"{damaged} (nor is the last good copy: {exc})"), False
    write_public(crl_path, data)
    RESTORES[str(crl_path)] += 1
    log.error(
        "%s; put back the last good copy %s (CRLNumber %d, %d entries): a broker that reloaded "
        "the damaged file ran without a CRL check until it reloads this one",
        damaged, keep, disk.number, len(disk.entries),
    )  # fmt: skip
    return disk, True


class BrokerCrl:
    """The CRL the broker reads, as the enrollment service checks records and claims against
    it: read again when the file changed. ConfigError (and an ERROR) while it cannot be read
    or is not the CA's: a check that cannot be made refuses, it is never skipped (an empty CRL
    would let an older record put back re-enroll a revoked device)."""

    def __init__(self, ca: FleetCA, path: Path) -> None:
        self.ca, self.path = ca, path
        self._seen: tuple[object, DiskCrl] = (None, DiskCrl())

    def read(self) -> DiskCrl:
        try:
            # The file's identity from the handle its bytes are read from: a rename between a
            # stat and an open would pair one file's key with another's contents.
            with self.path.open("rb") as fh:
                stat = os.fstat(fh.fileno())
                seen = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
                if seen != self._seen[0]:
                    disk = parse_crl(self.ca, fh.read(), self.path)
                    behind_last_good(self.ca, self.path, disk)
                    self._seen = (seen, disk)
        except (OSError, ConfigError) as exc:
            log.error("%s: records cannot be checked against the CRL (%s)", self.path, exc)
            raise ConfigError(f"the CRL {self.path} cannot be read ({exc})") from exc
        return self._seen[1]


@contextlib.contextmanager
def one_writer(crl_path: Path) -> Iterator[None]:
    """One writer of ``crl_path`` at a time, across processes. Each reads the CRL on disk and
    writes it again with its own additions: two at once (the enrollment service's refresh and a
    ``fleet revoke``) would each write what the other had not seen, and one revocation (a
    device's, a probe's) would be gone from the CRL until the next write."""
    import fcntl

    crl_path.parent.mkdir(parents=True, exist_ok=True)
    with crl_path.with_name(f".{crl_path.name}.lock").open("ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield
