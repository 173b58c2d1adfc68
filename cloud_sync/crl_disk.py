"""The CRL on disk, the one the broker reads: what it lists, its CRLNumber, one writer at a time.

Import path and API::

    from cloud_sync.crl_disk import DiskCrl, one_writer, read_disk_crl
    with one_writer(crl_path):
        disk = read_disk_crl(ca, crl_path, first=False)   # ConfigError when there is none
        disk.entries, disk.number

Why: the CRL is signed by the fleet CA and lives outside the bucket, so it is what the CRL
writer trusts when the store's index may have been put back. The index carries a signed,
always-increasing ``generation`` and each CRL written carries the generation it was written
from as its CRLNumber (RFC 5280 5.2.3): an index whose generation is below the number of the
CRL on disk is an older one put back (``cloud_sync.revocation.publish_crl`` refuses it). With
no CRL on disk (a new host, a lost file) nothing says which index is the latest, so the writer
does not write one from the store alone unless told that this is the first (``first``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modelpack.errors import ConfigError

if TYPE_CHECKING:
    from cloud_sync.fleet_ca import FleetCA

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskCrl:
    entries: dict[int, dt.datetime] = field(default_factory=dict)  # serial: revocation date
    number: int = 0  # its CRLNumber: the index generation it was written from (0: none)


def read_disk_crl(ca: FleetCA, crl_path: Path, first: bool = False) -> DiskCrl:
    """The CRL at ``crl_path``, checked against the CA. None there, unreadable or another
    issuer's: ConfigError, unless ``first`` (the fleet's first CRL on this host), when it reads
    as empty (an ERROR if a file was there)."""
    from cryptography import x509

    try:
        entries = ca.crl_entries(crl_path)
        ext = x509.load_pem_x509_crl(crl_path.read_bytes()).extensions
        try:
            number = int(ext.get_extension_for_class(x509.CRLNumber).value.crl_number)
        except x509.ExtensionNotFound:
            number = 0
    except (OSError, ConfigError) as exc:
        if not first:
            raise ConfigError(
                f"{exc}: not writing a CRL from the store alone, which may be an older one "
                "put back; restore the broker's CRL, or pass --first-crl if this is the "
                "fleet's first CRL on this host"
            ) from exc
        if crl_path.exists():
            log.error("%s: the first CRL is written from the store alone", exc)
        return DiskCrl()
    return DiskCrl(entries, number)


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
