"""A device's certificates as the enrollment service issues and the device takes them up: the
record's writes for a claim or renewal answered, a rotation confirmed, a renewal left
unconfirmed past the grace (``cloud_sync.identity_rotation`` says when a certificate retires).

Import path and API (through IdentityStore, which is a Renewals)::

    ids.check_may_renew("cam-1", budget, "req-7")   # ClaimRefused unless enrolled, not
                                                    # revoked, within its renewal budget
    ids.record_issue("cam-1", cert, via="renew", budget=budget, request="req-7")  # pending
                                                    # until the device confirms it; spends one
    ids.record_issue("cam-1", cert, via="claim", claim=spent)  # consume_claim's Spent
    ids.confirm_rotation("cam-1", serial)           # ``rotated``: the replaced ones retired
    ids.unlisted(doc)                               # one retired that the CRL lacks: write it
    ids.settle_overdue(docs)                        # the CRL refresh: past the grace, settled
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from cloud_sync.identity_claims import ClaimRefused, Spent
from cloud_sync.identity_records import CertRecord, DeviceIdentity, RecordRefused, retired_entries
from cloud_sync.identity_rotation import issued, overdue, rotated, settled
from cloud_sync.renewal_budget import RenewalBudget, refusal, spend
from modelpack.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from cloud_sync.crl_disk import BrokerCrl
    from cloud_sync.identity_records import CrlEntry
    from cloud_sync.spent_claims import SpentClaims

log = logging.getLogger(__name__)


class Renewals:
    rotation_grace_s: float
    spent: SpentClaims | None
    crl: BrokerCrl | None

    if TYPE_CHECKING:  # IdentityStore's

        def acting_on(self, device: str) -> DeviceIdentity | None: ...
        def _change(
            self, device: str, change: Any, over_refused: bool = False
        ) -> DeviceIdentity: ...
        def _add_to_crl(self, entries: list[CrlEntry]) -> None: ...

    def check_may_renew(
        self, device: str, budget: RenewalBudget | None = None, request: str | None = None
    ) -> None:
        """Before the CA signs: the record's word (``record_issue`` checks the budget again
        inside its compare-and-swap, where racing renewals meet)."""
        doc = self.acting_on(device)
        if doc is None:
            raise ClaimRefused("not_enrolled", f"{device} never enrolled: it needs a claim token")
        if doc.revoked:
            raise ClaimRefused("revoked", f"{device} is revoked")
        refused = None if budget is None else refusal(doc, budget, time.time(), request)
        if refused is not None:
            raise refused

    def record_issue(
        self,
        device: str,
        cert: Any,
        via: str,
        claim: Spent | None = None,
        budget: RenewalBudget | None = None,
        request: str | None = None,
    ) -> DeviceIdentity:
        """The certificate just issued; a renewal's is pending until the device shows it holds
        it (``confirm_rotation``): the one it runs with stays valid (``identity_rotation``).
        A renewal spends one of the device's ``budget`` (``cloud_sync.renewal_budget``) in the
        same write: ClaimRefused (``renewal_budget``, ``replayed``) and nothing written when
        it is spent, the certificate signed for it never handed out.
        A claim's (``claim``: what consume_claim spent) is refused when the record it meets is
        revoked by a revocation the claim did not come after: ``fleet revoke`` landing between
        the claim's check and this write (its record write changes the etag, so the change
        runs again on the revoked record) must not be undone by the claim it raced."""
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
            if via == "renew" and budget is not None:
                doc = spend(doc, budget, now, request)
            if doc.revoked and self._before_revocation(device, doc, claim):
                raise ClaimRefused(
                    "revoked", f"{device} was revoked after this claim was issued: make a new one"
                )
            return issued(settled(doc, now, self.rotation_grace_s), record, via, now)

        return self._retired(self._change(device, change))

    def _before_revocation(self, device: str, doc: DeviceIdentity, claim: Spent | None) -> bool:
        """Whether the claim existed when ``doc`` (revoked) was revoked: this host's list says
        so (written before the record, no clock compared), or it was made at or before the
        record's revocation time. No claim given (a caller of old): never."""
        if claim is None:
            return False
        if self.spent is not None:
            try:
                with self.spent.held() as held:
                    if held.why_not(claim.key_hash, device) == "revoked":
                        return True
            except ConfigError as exc:  # unreadable: fail closed
                raise ClaimRefused("record_refused", f"{device}'s claim: {exc}") from exc
        return claim.created_at <= (doc.revoked_at or 0.0)

    def confirm_rotation(self, device: str, serial: str | None) -> DeviceIdentity:
        """The device runs with ``serial`` (it said ``rotated`` over a connection made with
        it): the certificates it replaced are retired. ClaimRefused (bad_request) for a serial
        that is neither its current nor a pending one."""
        now, same = time.time(), [False]

        def change(doc: DeviceIdentity) -> DeviceIdentity:
            try:
                new = rotated(settled(doc, now, self.rotation_grace_s), str(serial), now)
            except ValueError as exc:
                raise ClaimRefused("bad_request", "that is not the device's certificate") from exc
            same[0] = new == doc
            return new

        doc = self._change(device, change)
        if same[0] and not self.unlisted(doc):
            # The same ``rotated`` again (a stolen key, once a second): the record and the CRL
            # already hold it, so the fleet-wide index (~40 ms for 20k entries) is not read.
            return doc
        return self._retired(doc)

    def unlisted(self, doc: DeviceIdentity) -> bool:
        """Whether a certificate ``doc`` retired, unexpired, is missing from the CRL the broker
        reads (True when there is none to compare with, or it does not read): a ``rotated``
        that retired nothing new writes no CRL, so a device saying it again and again (a
        stolen key, once a second) does not rewrite the CRL and signal the broker each time;
        one whose CRL write failed is written at the device's next ``rotated``."""
        if self.crl is None:
            return bool(doc.retired)
        try:
            listed = self.crl.read().serials
        except ConfigError:
            return True
        now = time.time()
        return any(e.serial not in listed for e in retired_entries(doc) if e.not_after > now)

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
