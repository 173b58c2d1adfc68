"""A device's certificates as the enrollment service issues and the device takes them up: the
record's writes for a claim or renewal answered, a rotation confirmed, a renewal left
unconfirmed past the grace (``cloud_sync.identity_rotation`` says when a certificate retires).

Import path and API (through IdentityStore, which is a Renewals)::

    ids.check_may_renew("cam-1")                    # ClaimRefused unless enrolled, not revoked
    ids.record_issue("cam-1", cert, via="renew")    # pending until the device confirms it
    ids.confirm_rotation("cam-1", serial)           # ``rotated``: the replaced ones retired
    ids.settle_overdue(docs)                        # the CRL refresh: past the grace, settled
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from cloud_sync.identity_claims import ClaimRefused
from cloud_sync.identity_records import CertRecord, DeviceIdentity, RecordRefused, retired_entries
from cloud_sync.identity_rotation import issued, overdue, rotated, settled
from modelpack.errors import StoreError

if TYPE_CHECKING:
    from cloud_sync.identity_records import CrlEntry

log = logging.getLogger(__name__)


class Renewals:
    rotation_grace_s: float

    if TYPE_CHECKING:  # IdentityStore's

        def acting_on(self, device: str) -> DeviceIdentity | None: ...
        def _change(
            self, device: str, change: Any, over_refused: bool = False
        ) -> DeviceIdentity: ...
        def _add_to_crl(self, entries: list[CrlEntry]) -> None: ...

    def check_may_renew(self, device: str) -> None:
        doc = self.acting_on(device)
        if doc is None:
            raise ClaimRefused("not_enrolled", f"{device} never enrolled: it needs a claim token")
        if doc.revoked:
            raise ClaimRefused("revoked", f"{device} is revoked")

    def record_issue(self, device: str, cert: Any, via: str) -> DeviceIdentity:
        """The certificate just issued; a renewal's is pending until the device shows it holds
        it (``confirm_rotation``): the one it runs with stays valid (``identity_rotation``)."""
        now = time.time()
        record = CertRecord(
            serial=format(cert.serial_number, "x"),
            issued_at=now,
            not_after=cert.not_valid_after_utc.timestamp(),
            via=via,
        )

        def change(doc: DeviceIdentity) -> DeviceIdentity:
            if doc.revoked and via == "renew":
                raise ClaimRefused("revoked", f"{device} is revoked")
            return issued(settled(doc, now, self.rotation_grace_s), record, via, now)

        return self._retired(self._change(device, change))

    def confirm_rotation(self, device: str, serial: str | None) -> DeviceIdentity:
        """The device runs with ``serial`` (it said ``rotated`` over a connection made with
        it): the certificates it replaced are retired. ClaimRefused (bad_request) for a serial
        that is neither its current nor a pending one."""
        now = time.time()

        def change(doc: DeviceIdentity) -> DeviceIdentity:
            doc = settled(doc, now, self.rotation_grace_s)
            try:
                return rotated(doc, str(serial), now)
            except ValueError as exc:
                raise ClaimRefused("bad_request", "that is not the device's certificate") from exc

        return self._retired(self._change(device, change))

    def settle_overdue(self, docs: dict[str, DeviceIdentity]) -> dict[str, DeviceIdentity]:
        """``docs`` with every renewal unconfirmed past the grace settled and written (the CRL
        refresh's: ``fold_records``)."""
        now, done = time.time(), dict(docs)
        for device, doc in docs.items():
            if overdue(doc, now, self.rotation_grace_s):
                try:
                    done[device] = self._change(
                        device, lambda d: settled(d, now, self.rotation_grace_s)
                    )
                except (RecordRefused, StoreError) as exc:
                    log.error("%s: a renewal left unconfirmed is not settled: %s", device, exc)
        return done

    def _retired(self, doc: DeviceIdentity) -> DeviceIdentity:
        # Every certificate the record retires, not only the latest: the index is written
        # after the record, so one that a crash or a failing store kept out comes back here.
        self._add_to_crl(retired_entries(doc))
        return doc
