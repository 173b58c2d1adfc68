"""What the cloud keeps about device identities, in the store: claims and certificate records.

Import path and API::

    from cloud_sync.identity_store import IdentityStore
    ids = IdentityStore(store, ca)          # ca: signs claims, checks them (reading needs none)
    tokens = ids.create_claims(["cam-1", "cam-2"], ttl_s=86400)   # {"cam-1": "ebc1....", ...}
    token = ids.create_batch_claim(["cam-1", "cam-2"], ttl_s=3600)  # one token, an allow-list
    ids.consume_claim(token, "cam-1")       # ClaimRefused(reason) unless valid, bound, unused
    ids.record_issue("cam-1", cert, via="claim")
    ids.revoke("cam-1"); ids.revoked_serials()   # what the CRL lists

Only a claim token's SHA-256 is stored (``fleet/identity/claims/{sha256}.json``): whoever reads
the bucket cannot enroll a device with it. A claim is signed by the fleet CA's issuing key (over
its hash, devices, batch flag and times): whoever writes the bucket without that key cannot
plant a claim of its own or widen one. A claim is spent by a compare-and-swap on its etag: two
enrollments racing with one token cannot both win. A device's record (``.../devices/{id}.json``)
lists its certificates; those it rotated away from, and all once it is revoked, are in the CRL.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError

from cloud_sync.rollout_state import check_device_ids
from cloud_sync.store import ObjectStore
from modelpack.errors import ConfigError, ConflictError, NotFoundError, StoreError

if TYPE_CHECKING:
    from cloud_sync.fleet_ca import FleetCA

ROOT = "fleet/identity"
CRL_INDEX = f"{ROOT}/crl.json"
SCHEMA_VERSION = 1
TOKEN_PREFIX = "ebc1."
# Device ids that would collide with the cloud's identities or the enrollment topics, the
# broker's own certificate (CN broker) or the certificate `fleet revoke` probes the CRL with.
RESERVED_IDS = frozenset(
    {"sync", "controller", "operator", "claim", "enroll", "group", "broker", "revocation-probe"}
)
_TRIES = 20


class ClaimRefused(Exception):
    """A claim or renewal that is refused; ``reason`` is the counter's label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ClaimDoc(BaseModel):
    schema_version: int = SCHEMA_VERSION
    devices: list[str]
    batch: bool = False
    expires_at: float
    # A claim made before a device's revocation never re-enrolls it (0: a claim from before
    # this field, as old as any revocation).
    created_at: float = 0.0
    used: dict[str, float] = Field(default_factory=dict)
    signature: str | None = None  # FleetCA.sign_record over claim_body: not ``used``

    def body(self, key_hash: str) -> bytes:
        """What the CA signs: bound to the token's hash, so a signature moved onto another
        token's record does not verify."""
        fields = {"hash": key_hash, "devices": self.devices, "batch": self.batch}
        fields |= {"expires_at": self.expires_at, "created_at": self.created_at}
        return json.dumps(fields, sort_keys=True).encode()


class CertRecord(BaseModel):
    serial: str  # hex
    issued_at: float
    not_after: float
    via: str  # claim | renew


class CrlEntry(BaseModel):
    serial: str  # hex
    revoked_at: float  # the revocation, or the rotation that retired it
    not_after: float  # past it the entry is dropped: the certificate is refused anyway


class CrlIndex(BaseModel):
    """``fleet/identity/crl.json``: every certificate the CRL lists, kept as each is retired or
    revoked, so that writing the CRL reads one object instead of every device's record, and an
    entry stays until its certificate has expired (a revoked device enrolled again does not
    bring its old certificates back)."""

    schema_version: int = SCHEMA_VERSION
    entries: list[CrlEntry] = Field(default_factory=list)


class DeviceIdentity(BaseModel):
    schema_version: int = SCHEMA_VERSION
    device: str
    certificates: list[CertRecord] = Field(default_factory=list)
    current: str | None = None  # the serial the device runs with
    retired: list[str] = Field(default_factory=list)  # rotated away from: in the CRL
    last_rotation: float | None = None
    revoked: bool = False
    revoked_at: float | None = None

    def current_record(self) -> CertRecord | None:
        return next((c for c in self.certificates if c.serial == self.current), None)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def check_enrollable(devices: Iterable[str]) -> list[str]:
    devices = list(devices)
    check_device_ids(devices)
    taken = sorted(set(devices) & RESERVED_IDS)
    if taken:
        raise ConfigError(f"device id {taken[0]!r} is reserved for the cloud's identities")
    return devices


class IdentityStore:
    def __init__(self, store: ObjectStore, ca: FleetCA | None = None) -> None:
        self.store, self.ca = store, ca

    def _signer(self) -> FleetCA:
        if self.ca is None:
            raise ConfigError("claims are signed and checked with the fleet CA: give its --ca")
        return self.ca

    # --- claims -------------------------------------------------------------------------------

    def _new_claim(self, devices: list[str], ttl_s: float, batch: bool) -> str:
        if ttl_s <= 0:
            raise ConfigError("a claim's ttl must be positive")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now, key_hash = time.time(), token_hash(token)
        doc = ClaimDoc(devices=devices, batch=batch, expires_at=now + ttl_s, created_at=now)
        doc.signature = self._signer().sign_record(doc.body(key_hash))
        self.store.create(f"{ROOT}/claims/{key_hash}.json", doc.model_dump_json().encode())
        return token

    def create_claims(self, devices: Iterable[str], ttl_s: float) -> dict[str, str]:
        """One single-use token per device, each bound to that device alone."""
        return {d: self._new_claim([d], ttl_s, False) for d in check_enrollable(devices)}

    def create_batch_claim(self, devices: Iterable[str], ttl_s: float) -> str:
        """One token for an allow-list: each device in it may enroll with it once."""
        return self._new_claim(check_enrollable(devices), ttl_s, True)

    def consume_claim(self, token: str, device: str, now: float | None = None) -> None:
        ca, key_hash = self._signer(), token_hash(token)
        key = f"{ROOT}/claims/{key_hash}.json"
        for _ in range(_TRIES):
            try:
                data, etag = self.store.read(key)
            except NotFoundError:
                raise ClaimRefused("unknown_token", "no such claim token") from None
            try:
                doc = ClaimDoc.model_validate_json(data)
            except ValidationError as exc:
                raise StoreError(f"{key} in {self.store.url} is not a claim") from exc
            if not ca.verify_record(doc.body(key_hash), doc.signature):
                raise ClaimRefused("forged_claim", "the claim is not signed by the fleet CA")
            if (now or time.time()) >= doc.expires_at:
                raise ClaimRefused("expired_token", "the claim token has expired")
            if device not in doc.devices:
                raise ClaimRefused("wrong_device", f"the claim token is not for {device}")
            if device in doc.used or (doc.used and not doc.batch):
                raise ClaimRefused("token_reused", "the claim token was already used")
            record = self.device(device)
            if record is not None and record.revoked and doc.created_at <= (record.revoked_at or 0):
                # A spare token from before a revocation (a stolen device) must not undo it.
                raise ClaimRefused(
                    "revoked", f"{device} was revoked after this claim was issued: make a new one"
                )
            doc.used[device] = time.time()
            try:
                self.store.replace(key, doc.model_dump_json().encode(), etag)
                return
            except ConflictError:
                continue  # another enrollment spent it or another device of the batch: re-read
        raise StoreError(f"{key}: too many concurrent changes")

    # --- device records -------------------------------------------------------------------------

    def _key(self, device: str) -> str:
        return f"{ROOT}/devices/{device}.json"

    def device(self, device: str) -> DeviceIdentity | None:
        try:
            data = self.store.get_bytes(self._key(device))
        except NotFoundError:
            return None
        return self._parse(device, data)

    def _parse(self, device: str, data: bytes) -> DeviceIdentity:
        try:
            doc = DeviceIdentity.model_validate_json(data)
        except ValidationError as exc:
            raise StoreError(f"{self._key(device)} is not a device identity record") from exc
        if doc.device != device:
            raise StoreError(f"{self._key(device)} names device {doc.device!r}")
        return doc

    def _change(self, device: str, change: Any) -> DeviceIdentity:
        key = self._key(device)
        for _ in range(_TRIES):
            try:
                data, etag = self.store.read(key)
                doc: DeviceIdentity | None = self._parse(device, data)
            except NotFoundError:
                doc, etag = None, ""
            new = change(doc or DeviceIdentity(device=device))
            body = new.model_dump_json().encode()
            try:
                if doc is None:
                    self.store.create(key, body)
                else:
                    self.store.replace(key, body, etag)
                return new
            except ConflictError:
                continue
        raise StoreError(f"{key}: too many concurrent changes")

    def check_may_renew(self, device: str) -> None:
        doc = self.device(device)
        if doc is None:
            raise ClaimRefused("not_enrolled", f"{device} never enrolled: it needs a claim token")
        if doc.revoked:
            raise ClaimRefused("revoked", f"{device} is revoked")

    def record_issue(self, device: str, cert: Any, via: str) -> DeviceIdentity:
        record = CertRecord(
            serial=format(cert.serial_number, "x"),
            issued_at=time.time(),
            not_after=cert.not_valid_after_utc.timestamp(),
            via=via,
        )

        def change(doc: DeviceIdentity) -> DeviceIdentity:
            if doc.revoked and via == "renew":
                raise ClaimRefused("revoked", f"{device} is revoked")
            retired = list(doc.retired)
            if via == "renew" and doc.current is not None:
                retired.append(doc.current)
            return doc.model_copy(
                update={
                    "certificates": [*doc.certificates[-19:], record],
                    "current": record.serial,
                    "retired": retired[-50:],
                    "last_rotation": record.issued_at if via == "renew" else doc.last_rotation,
                    # A new claim re-enrolls a revoked device only if an operator issued one.
                    "revoked": False,
                    "revoked_at": None,
                }
            )

        retiring: list[CrlEntry] = []

        def noted(doc: DeviceIdentity) -> DeviceIdentity:
            old = doc.current_record() if via == "renew" else None
            retiring[:] = [] if old is None else [CrlEntry(
                serial=old.serial, revoked_at=record.issued_at, not_after=old.not_after
            )]  # fmt: skip
            return change(doc)

        new = self._change(device, noted)
        self._add_to_crl(retiring)
        return new

    def revoke(self, device: str) -> DeviceIdentity:
        def change(doc: DeviceIdentity) -> DeviceIdentity:
            return doc.model_copy(update={"revoked": True, "revoked_at": time.time()})

        if self.device(device) is None:
            raise ConfigError(f"{device} has no identity record: nothing to revoke")
        doc = self._change(device, change)
        at = doc.revoked_at or time.time()
        self._add_to_crl(
            [
                CrlEntry(serial=c.serial, revoked_at=at, not_after=c.not_after)
                for c in doc.certificates
            ]
        )
        return doc

    def revoke_serial(self, serial: int, not_after: float) -> None:
        """Into the CRL until it expires: a certificate that is no device's (the claim's)."""
        entry = CrlEntry(serial=format(serial, "x"), revoked_at=time.time(), not_after=not_after)
        self._add_to_crl([entry])

    # --- the CRL's entries ----------------------------------------------------------------------

    def _add_to_crl(self, entries: list[CrlEntry]) -> None:
        if entries:
            self._change_crl(lambda index: [*index.entries, *entries])

    def _change_crl(self, change: Any) -> CrlIndex:
        """Compare-and-swap on the index; entries of expired certificates are dropped."""
        key = CRL_INDEX
        for _ in range(_TRIES):
            try:
                data, etag = self.store.read(key)
                index: CrlIndex | None = CrlIndex.model_validate_json(data)
            except NotFoundError:
                index, etag = None, ""
            except ValidationError as exc:
                raise StoreError(f"{key} in {self.store.url} is not a CRL index") from exc
            now = time.time()
            kept: dict[str, CrlEntry] = {}
            for entry in change(index or self._rebuilt()):
                if entry.not_after > now and entry.serial not in kept:
                    kept[entry.serial] = entry
            new = CrlIndex(entries=list(kept.values()))
            if index is not None and new == index:
                return index  # nothing added, nothing expired: no write
            try:
                if index is None:
                    self.store.create(key, new.model_dump_json().encode())
                else:
                    self.store.replace(key, new.model_dump_json().encode(), etag)
                return new
            except ConflictError:
                continue
        raise StoreError(f"{key}: too many concurrent changes")

    def _rebuilt(self) -> CrlIndex:
        """The index of a store from before it existed: from every device's record, once."""
        entries = []
        for doc in self.devices().values():
            at = (doc.revoked_at if doc.revoked else doc.last_rotation) or 0.0
            retired = {c.serial for c in doc.certificates} if doc.revoked else set(doc.retired)
            entries += [
                CrlEntry(serial=c.serial, revoked_at=at, not_after=c.not_after)
                for c in doc.certificates
                if c.serial in retired
            ]
        return CrlIndex(entries=entries)

    def devices(self) -> dict[str, DeviceIdentity]:
        found = {}
        for key in self.store.list(f"{ROOT}/devices/"):
            device = key.rsplit("/", 1)[-1].removesuffix(".json")
            found[device] = self._parse(device, self.store.get_bytes(key))
        return found

    def revoked_serials(self) -> list[tuple[int, dt.datetime]]:
        """What the CRL lists: every unexpired certificate of a revoked device, and those a
        device rotated away from. One read of the index, whatever the size of the fleet."""
        index = self._change_crl(lambda index: index.entries)  # prunes; builds it once if absent
        return [
            (int(e.serial, 16), dt.datetime.fromtimestamp(e.revoked_at, dt.UTC))
            for e in index.entries
        ]
