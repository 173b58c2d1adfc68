"""What the cloud keeps about device identities, in the store: claims and certificate records.

Import path and API::

    from cloud_sync.identity_store import IdentityStore
    ids = IdentityStore(store, ca)          # ca: signs and checks (views read without one)
    tokens = ids.create_claims(["cam-1", "cam-2"], ttl_s=86400)   # {"cam-1": "ebc1....", ...}
    token = ids.create_batch_claim(["cam-1", "cam-2"], ttl_s=3600)  # one token, an allow-list
    ids.consume_claim(token, "cam-1")       # ClaimRefused(reason) unless valid, bound, unused
    ids.record_issue("cam-1", cert, via="claim")
    ids.revoke("cam-1"); ids.revoked_serials()   # what the CRL lists
    ids.device("cam-1")                     # its record; RecordRefused unless the CA signed it

Claims are ``cloud_sync.identity_claims``'s (signed, single use). A device's record
(``fleet/identity/devices/{id}.json``) lists its certificates; those it rotated away from, and
all once it is revoked, are in the CRL.

Device records and the CRL's index (``crl.json``) are signed by the issuing key too
(``cloud_sync.identity_records``), bound to their object's key, and checked whenever they are
read back with a CA: one that was changed, moved (to another key, or from another store that
shares the CA: ``cloud_sync.identity_environment``), never signed (an older release's) or signed
by another key is refused with ``RecordRefused`` (a StoreError, counted in ``refused``), never
acted on: no enrollment, renewal or rotation goes by it, and a refused index leaves the CRL
writer keeping what its CRL lists (``cloud_sync.revocation.publish_crl``). Writing needs the CA;
without one (``fleet identity`` without ``--ca``) records are read unchecked, to be shown only.
The index's reads and writes are ``cloud_sync.identity_crl``'s (a base class of this one).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cloud_sync.crl_disk import BrokerCrl, DiskCrl, last_good
from cloud_sync.identity_claims import (
    ClaimDoc,
    ClaimRefused,
    Spent,
    claims_naming,
    new_claim,
    spend_claim,
    token_hash,
)
from cloud_sync.identity_crl import CRL_INDEX, ROOT, TRIES, CrlIndexWriter
from cloud_sync.identity_environment import EnvironmentCA, environment_of
from cloud_sync.identity_records import (
    RECORD_MAX_BYTES,
    CertRecord,
    CrlEntry,
    CrlIndex,
    DeviceIdentity,
    RecordRefused,
    device_of,
    opened,
    read_capped,
    salvaged,
    unchecked,
)
from cloud_sync.identity_renewals import Renewals
from cloud_sync.identity_rotation import ROTATION_GRACE_S
from cloud_sync.reserved_ids import check_enrollable, check_revocable
from cloud_sync.spent_claims import SpentClaims, spent_path
from cloud_sync.store import ObjectStore
from modelpack.errors import ConfigError, NotFoundError, StoreError, clip, first_problem

if TYPE_CHECKING:
    from cloud_sync.fleet_ca import FleetCA

__all__ = ["CRL_INDEX", "ROOT", "CertRecord", "CrlEntry", "CrlIndex", "DeviceIdentity"]
__all__ += ["IdentityStore"]
__all__ += ["ClaimDoc", "ClaimRefused", "RecordRefused", "check_enrollable", "token_hash"]

log = logging.getLogger(__name__)
_LOGGED = 10  # refused records logged one by one at a listing; the rest in one count


class IdentityStore(CrlIndexWriter, Renewals):
    def __init__(
        self, store: ObjectStore, ca: FleetCA | None = None, crl_file: Path | None = None
    ) -> None:
        self.store = store
        # Every record and index this store signs or checks is bound to the store's
        # environment, so that one copied from another store of the same CA is refused.
        self.ca = None if ca is None else EnvironmentCA(ca, environment_of(store))
        # The CRL the broker reads, outside the bucket: what acting_on checks records against,
        # and consume_claim claims (its ledger of revoked devices, ``cloud_sync.crl_disk``).
        self.crl = BrokerCrl(ca, crl_file) if ca is not None and crl_file is not None else None
        # Beside it, this host's own list of spent and revoked claims (``spent_claims``).
        self.spent = SpentClaims(spent_path(crl_file), last_good(crl_file)) if crl_file else None
        self.refused: Counter[tuple[str, str]] = Counter()  # (object kind, reason) read back
        self.refused_records: dict[str, str] = {}  # device: reason, at the last devices()
        self.fleet_size = 0  # device records at the last listing: the index's size limit
        self.rotation_grace_s = ROTATION_GRACE_S  # a renewal unconfirmed for longer: settled

    def signer(self) -> FleetCA:
        if self.ca is None:
            raise ConfigError("identity records are signed and checked with the fleet CA: --ca")
        return self.ca

    def read_object(self, key: str, kind: str, limit: int) -> tuple[bytes, str]:
        """The object's bytes and etag, at most ``limit`` of them (``read_capped``): a bigger
        one is refused as malformed and counted."""
        try:
            return read_capped(self.store, key, limit)
        except RecordRefused as exc:
            self.refused[(kind, exc.reason)] += 1
            raise

    def _open(self, key: str, data: bytes, kind: str) -> bytes:
        """The signed bytes of a record or index (unchecked without a CA: views only)."""
        try:
            return unchecked(key, data) if self.ca is None else opened(self.ca, key, data)
        except RecordRefused as exc:
            self.refused[(kind, exc.reason)] += 1
            raise

    # --- claims (cloud_sync.identity_claims) ------------------------------------------------

    def create_claims(self, devices: Iterable[str], ttl_s: float) -> dict[str, str]:
        """One single-use token per device, each bound to that device alone."""
        ca = self.signer()
        return {d: new_claim(self.store, ca, [d], ttl_s, False) for d in check_enrollable(devices)}

    def create_batch_claim(self, devices: Iterable[str], ttl_s: float) -> str:
        """One token for an allow-list: each device in it may enroll with it once."""
        return new_claim(self.store, self.signer(), check_enrollable(devices), ttl_s, True)

    def consume_claim(self, token: str, device: str, now: float | None = None) -> Spent:
        """The claim spent for ``device`` (ClaimRefused otherwise): pass it to record_issue."""
        held, ca = None if self.spent is None else self.spent.held, self.signer()
        checks = (self.acting_on, now, self.last_revocation, held)
        return spend_claim(self.store, ca, token, device, *checks)

    def _void_claims(self, device: str) -> None:
        """Every claim the CA made here that names ``device``, spent or not, listed as revoked
        for it on this host: none of them enrolls it again, whatever the claim host's clock
        said when it was made (``spent_claims``). After the revoked record and the CRL (which
        already refuse a claim made at or before the revocation): nothing here stops those."""
        if self.spent is None:
            return
        try:
            named = claims_naming(self.store, self.signer(), device, self.refused)
            with self.spent.held() as held:
                held.add(device, "revoked", named)
        except (ConfigError, StoreError, OSError) as exc:  # the revocation itself stands
            log.error("%s: its claims are not listed as revoked on this host: %s", device, exc)

    def last_revocation(self, device: str) -> float | None:
        """When the CRL the broker reads says ``device`` was last revoked (None: never, or no
        CRL configured): a claim issued before then is refused, whatever the bucket holds."""
        return self._broker_crl(device).devices.get(device)

    def _broker_crl(self, device: str) -> DiskCrl:
        try:
            return self.crl.read() if self.crl is not None else DiskCrl()
        except ConfigError as exc:  # fail closed: the check is configured, so it is made
            raise ClaimRefused("record_refused", f"{device}'s identity record: {exc}") from exc

    # --- device records -------------------------------------------------------------------------

    def _key(self, device: str) -> str:
        return f"{ROOT}/devices/{device}.json"

    def device(self, device: str) -> DeviceIdentity | None:
        """The device's record, None when it has none; RecordRefused when it does not verify."""
        try:
            data, _ = self.read_object(self._key(device), "device", RECORD_MAX_BYTES)
        except NotFoundError:
            return None
        return self._parse(device, data)

    def acting_on(self, device: str) -> DeviceIdentity | None:
        """The record an enrollment, renewal or rotation goes by: checked, or refused.

        A signature binds what a record holds, not when it was written: an older signed record
        put back (from before the revocation) verifies. With ``crl_file``, one that says the
        device is not revoked is refused too when that CRL (signed by the CA, outside the
        bucket) lists the certificate it runs with, or names the device revoked after every
        certificate the record names was issued (its certificate has expired and left the CRL
        since); and so is every record while that CRL cannot be read."""
        self.signer()
        try:
            doc = self.device(device)
        except RecordRefused as exc:
            log.error("%s", exc)
            raise ClaimRefused("record_refused", f"{device}'s identity record: {exc}") from exc
        disk = self._broker_crl(device)
        if doc is None or doc.revoked:
            return doc
        why, revoked_at = "", disk.devices.get(device)
        if doc.current in disk.serials:
            why = f"says its certificate {doc.current} is valid but the CRL lists it"
        elif revoked_at is not None and all(c.issued_at <= revoked_at for c in doc.certificates):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(revoked_at))
            why = f"says it is not revoked, but the CRL says it was revoked at {when} UTC"
        if why:
            raise ClaimRefused(
                "record_refused",
                f"{device}'s identity record {why} (an older record put back in the store): "
                "`fleet revoke` it",
            )
        return doc

    def _parse(self, device: str, data: bytes) -> DeviceIdentity:
        key = self._key(device)
        body = self._open(key, data, "device")
        try:
            doc = DeviceIdentity.model_validate_json(body)
        except ValidationError as exc:
            raise self._malformed(key, first_problem(exc, "the record")) from exc
        if doc.device != device:
            raise self._malformed(key, f"it names device {clip(repr(doc.device))}")
        return doc

    def _malformed(self, key: str, why: str) -> RecordRefused:
        self.refused[("device", "malformed")] += 1
        return RecordRefused(key, "malformed", f"{key} is not a device identity record: {why}")

    def _change(self, device: str, change: Any, over_refused: bool = False) -> DeviceIdentity:
        """``change`` applied to the record, signed, written by compare-and-swap. A refused
        record raises, unless ``over_refused`` (a revocation): then its certificates, unchecked
        (``salvaged``), are what ``change`` gets, and the signed result replaces it."""
        key, ca = self._key(device), self.signer()
        for _ in range(TRIES):
            etag, exists, data = "", True, b""
            try:
                data, etag = self.read_object(key, "device", RECORD_MAX_BYTES)
                doc: DeviceIdentity | None = self._parse(device, data)
            except NotFoundError:
                doc, exists = None, False
            except RecordRefused as exc:
                if not over_refused:
                    raise
                if not etag:  # too big to read: it names nothing read, and goes
                    self.store.delete(key)
                    exists = False
                log.error("%s; revoking every certificate it names", exc)
                doc = salvaged(device, key, data, time.time())
            new = change(doc or DeviceIdentity(device=device))
            if exists and new == doc:
                return new  # nothing changed: no write
            if self._write_signed(ca, key, new, etag if exists else None):
                return new
        raise StoreError(f"{key}: too many concurrent changes")

    def revoke(self, device: str) -> DeviceIdentity:
        """Revoked, whatever its record: one refused is replaced by a signed, revoked record of
        the certificates it names; none at all by a signed revoked record of none (so a claim
        issued before now is refused, ``spend_claim``)."""

        def change(doc: DeviceIdentity) -> DeviceIdentity:
            return doc.model_copy(update={"revoked": True, "revoked_at": time.time()})

        check_revocable([device], lambda d: self.store.exists(self._key(d)))
        doc = self._change(device, change, over_refused=True)
        at = doc.revoked_at or time.time()
        self._add_to_crl(
            [
                CrlEntry(serial=c.serial, revoked_at=at, not_after=c.not_after)
                for c in doc.certificates
            ]
        )
        self._void_claims(device)  # last: its time depends on the bucket's claims
        return doc

    def devices(self) -> dict[str, DeviceIdentity]:
        """Every device's record that verifies; those that do not are left out, each with an
        ERROR, and listed in ``refused_records`` (device: reason) for the views. One the store
        fails to read (a symlink loop, a GET that fails) is refused as ``unreadable``: one
        planted object must not stop every CRL write that reads the records."""
        found: dict[str, DeviceIdentity] = {}
        self.refused_records = {}
        keys = self.store.list(f"{ROOT}/devices/")
        self.fleet_size = len(keys)  # what the index's size limit scales with
        for key in keys:
            device = device_of(key)
            try:
                if device is None:
                    self.refused[("device", "misplaced")] += 1
                    shown = key if key.isprintable() else ascii(key)
                    raise RecordRefused(key, "misplaced", f"{shown} is no device's record key")
                found[device] = self._parse(device, self._read_record(key))
            except NotFoundError:  # deleted since listed
                continue
            except RecordRefused as exc:
                if len(self.refused_records) < _LOGGED:
                    log.error("%s", exc)
                self.refused_records[device or key] = exc.reason
        if len(self.refused_records) > _LOGGED:  # thousands planted: one line, not thousands
            log.error("%d device records refused in all", len(self.refused_records))
        return found

    def _read_record(self, key: str) -> bytes:
        """A device record's bytes; RecordRefused (``unreadable``, counted) when the store
        fails to read it."""
        try:
            return self.read_object(key, "device", RECORD_MAX_BYTES)[0]
        except (RecordRefused, NotFoundError):
            raise
        except StoreError as exc:
            self.refused[("device", "unreadable")] += 1
            shown = key if key.isprintable() else ascii(key)
            raise RecordRefused(key, "unreadable", f"{shown} cannot be read: {exc}") from exc
