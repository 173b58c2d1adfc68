"""The CRL on disk, the one the broker reads: what it lists and until when, which devices were
revoked and when, its CRLNumber, one writer at a time.

Import path and API::

    from cloud_sync.crl_disk import BrokerCrl, DiskCrl, crl_pem, one_writer, read_disk_crl
    with one_writer(crl_path):
        disk = read_disk_crl(ca, crl_path, first=False)   # ConfigError when there is none
        disk.entries, disk.number, disk.not_after, disk.devices
        write_public(crl_path, crl_pem(ca, entries, number, not_after, devices))
    BrokerCrl(ca, crl_path).read()      # the same, read again only when the file changed

Why: the CRL is signed by the fleet CA and lives outside the bucket, so it is what the CRL
writer trusts when the store's index may have been put back. The index carries a signed,
always-increasing ``generation`` and each CRL written carries the generation it was written
from as its CRLNumber (RFC 5280 5.2.3): an index whose generation is below the number of the
CRL on disk is an older one put back (``cloud_sync.crl_publish.publish_crl`` refuses it). With
no CRL on disk (a new host, a lost file) nothing says which index is the latest, so the writer
does not write one from the store alone unless told that this is the first (``first``).

An X.509 CRL entry holds a serial and a date, not when the certificate expires, nor whose it
was. So each CRL also carries a ledger, in one non-critical extension of its own (``LEDGER``, a
UUID-based OID that OpenSSL and Mosquitto ignore), signed by the CA with the rest:

- ``not_after``: each listed certificate's notAfter. An entry stays listed until then, whatever
  the bucket's index says or lost (an entry of a CRL from before the ledger is kept until the
  issuing certificate expires: nothing local says when its certificate does);
- ``devices``: each revoked device and the time of its last revocation, kept for the life of
  the issuing key. A claim issued before it is refused, and so is a record that says the
  device is not revoked but names no certificate issued after it (an older record put back),
  whatever the bucket holds or lost (``cloud_sync.identity_store``, ``identity_claims``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpack.errors import ConfigError

if TYPE_CHECKING:
    from cloud_sync.fleet_ca import FleetCA

log = logging.getLogger(__name__)
# 2.25.{UUID} (ITU-T X.667): an OID of edgebento's own, no registry needed.
LEDGER = "2.25.259284619126166953979274007328769758746"
_UTF8STRING = 0x0C


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


def _der_utf8(text: str) -> bytes:
    body = text.encode()
    if len(body) < 0x80:
        return bytes([_UTF8STRING, len(body)]) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([_UTF8STRING, 0x80 | len(size)]) + size + body


def _from_der_utf8(data: bytes) -> str:
    if len(data) < 2 or data[0] != _UTF8STRING:
        raise ValueError("not a UTF8String")
    size, at = data[1], 2
    if size & 0x80:
        at = 2 + (size & 0x7F)
        size = int.from_bytes(data[2:at], "big")
    if len(data) != at + size:
        raise ValueError("the UTF8String's length is wrong")
    return data[at:].decode()


def ledger_extension(not_after: Mapping[int, float], devices: Mapping[str, float]) -> Any:
    """The CRL's ledger (see the module's docstring) as an X.509 extension."""
    from cryptography import x509

    doc = {
        "v": 1,
        # Rounded up (whole seconds, milliseconds): never an entry dropped, nor a claim let
        # through, early.
        "not_after": {format(s, "x"): math.ceil(t) for s, t in sorted(not_after.items())},
        "devices": {d: math.ceil(t * 1000) / 1000 for d, t in sorted(devices.items())},
    }
    text = json.dumps(doc, separators=(",", ":"))
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(LEDGER), _der_utf8(text))


def _ledger(crl: Any) -> tuple[dict[int, float], dict[str, float]]:
    from cryptography import x509

    try:
        raw = crl.extensions.get_extension_for_oid(x509.ObjectIdentifier(LEDGER)).value.value
    except x509.ExtensionNotFound:
        return {}, {}  # a CRL from before the ledger
    try:
        doc = json.loads(_from_der_utf8(raw))
        until = {int(s, 16): float(t) for s, t in doc["not_after"].items()}
        return until, {str(d): float(t) for d, t in doc["devices"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"the CRL's ledger cannot be read ({exc})") from exc


def crl_pem(
    ca: FleetCA,
    entries: Iterable[tuple[int, dt.datetime]],
    number: int,
    not_after: Mapping[int, float],
    devices: Mapping[str, float],
) -> bytes:
    """The CRL with its ledger, signed by the CA."""
    return ca.crl(sorted(entries), number=number, extensions=[ledger_extension(not_after, devices)])


def _parse(ca: FleetCA, crl_path: Path) -> DiskCrl:
    """ConfigError unless the CA signed the CRL at ``crl_path`` and it reads whole."""
    from cryptography import x509

    entries = ca.crl_entries(crl_path)
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    try:
        number = int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        number = 0
    until, devices = _ledger(crl)
    return DiskCrl(entries, number, until, devices)


def read_disk_crl(ca: FleetCA, crl_path: Path, first: bool = False) -> DiskCrl:
    """The CRL at ``crl_path``, checked against the CA. None there, unreadable or another
    issuer's: ConfigError, unless ``first`` (the fleet's first CRL on this host), when it reads
    as empty (an ERROR if a file was there)."""
    try:
        return _parse(ca, crl_path)
    except (OSError, ValueError, ConfigError) as exc:
        if not first:
            raise ConfigError(
                f"{exc}: not writing a CRL from the store alone, which may be an older one "
                "put back; restore the broker's CRL, or pass --first-crl if this is the "
                "fleet's first CRL on this host"
            ) from exc
        if crl_path.exists():
            log.error("%s: the first CRL is written from the store alone", exc)
        return DiskCrl()


class BrokerCrl:
    """The CRL the broker reads, as the enrollment service checks records and claims against
    it: read again when the file changes. ConfigError (and an ERROR) while it cannot be read
    or is not the CA's: a check that cannot be made refuses, it is never skipped (an empty CRL
    would let an older record put back re-enroll a revoked device)."""

    def __init__(self, ca: FleetCA, path: Path) -> None:
        self.ca, self.path = ca, path
        self._seen: tuple[object, DiskCrl] = (None, DiskCrl())

    def read(self) -> DiskCrl:
        try:
            stat = self.path.stat()
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if seen != self._seen[0]:
                self._seen = (seen, _parse(self.ca, self.path))
        except (OSError, ValueError, ConfigError) as exc:
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
