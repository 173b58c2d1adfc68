"""Device records and the CRL's index as the store keeps them: signed by the fleet CA.

Import path and API::

    from cloud_sync.identity_records import DeviceIdentity, CrlIndex, RecordRefused
    from cloud_sync.identity_records import sign, opened, unchecked
    ca = EnvironmentCA(fleet_ca, "s3://bucket/prod")     # cloud_sync.identity_environment
    data = sign(ca, "fleet/identity/devices/cam-1.json", doc.model_dump_json().encode())
    body = opened(ca, key, data)     # the signed JSON, or RecordRefused with a one-line reason
    body = unchecked(key, data)      # to show only, never to act on: the signature not checked

Why: whoever can write the bucket without the CA's key must not steer the fleet's identities
(DESIGN.md: what the controller reads back from the store, it trusts only if it signed it). A
device's record says whether it is revoked and which certificates it retired; the index says
what the CRL lists. Unsigned, a bucket writer could clear ``revoked`` so that a spare claim
re-enrolls a stolen device, drop a serial from ``crl.json`` so that the next CRL lets it back
in, or plant a record so that a certificate the CA never enrolled can renew.

The layout is ``cloud_sync.sealed``'s (the exact JSON bytes, ``"signature"`` appended as the
last field, so the file stays plain JSON); the signature is the issuing key's
(``FleetCA.sign_record``, ECDSA P-256, as claims are signed) over ``DOMAIN``, the object's key
and those bytes, which end with ``"environment"``: the store the record was written in
(``cloud_sync.identity_environment``). Bound to the key, a valid signature moved onto another
device's object (two records swapped) does not verify (``forged``); bound to the environment, a
record or index copied from another store that shares the CA (staging into prod) is refused as
``misplaced``, naming both; bound to the domain, a claim's signature is none of these.

Records and indexes written by the previous release carry no signature. They are refused
(reason ``unsigned``), never trusted, with a message naming ``edgebento fleet identity-repair``:
run once by an operator holding the CA key, it signs each old record that the CA-signed CRL
does not contradict and rebuilds the index from the signed records
(``cloud_sync.identity_repair``, docs/fleet-identity.md).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, ValidationError

from cloud_sync.fleet_ca import ISSUING_DAYS
from cloud_sync.rollout_state import DEVICE_ID
from cloud_sync.sealed import FIELD, append_mark, parse, signed_part
from modelpack import untrusted_json
from modelpack.errors import ConfigError, SizeLimitError, StoreError, clip

if TYPE_CHECKING:
    from cloud_sync.fleet_ca import FleetCA
    from cloud_sync.object_store import ObjectStore

SCHEMA_VERSION = 1
DOMAIN = b"edgebento identity record v2\n"  # v2: the environment is in the body
ENVIRONMENT = "environment"
REPAIR = "edgebento fleet identity-repair --ca DIR --crl-file CRL --store URL"
DEVICES = "fleet/identity/devices/"


# What a reader takes of one object (``read_capped``; a larger one is refused as malformed,
# having read one byte more). A record keeps at most 20 certificates, 50 retired and 20 pending
# serials, 100 renewal stamps: under 20 KiB signed, 64 KiB is room to spare; one is read for every
# device at each CRL refresh and ``fleet status``. The index holds each retired or revoked
# certificate until it expires, ~100 bytes each: a device rotating at two thirds of its
# certificate's life has one or two listed at a time, a revoked one up to 20, so 2 KiB a device
# (the device records the reader counted) above a floor of 1 MiB (~10,000 entries). A batch
# claim names at most MAX_CLAIM_DEVICES devices, each with the time it was spent: a 64-byte id
# twice, quoted, and a time, ~160 bytes a device, under 192; a one-device claim is under 2 KiB
# (its signature, times, environment). Every claim is read at each ``fleet revoke``: the cap is
# what the biggest real claim can be, no more (a bigger object is refused as malformed).
RECORD_MAX_BYTES = 64 << 10
INDEX_FLOOR_BYTES = 1 << 20
INDEX_DEVICE_BYTES = 2 << 10
MAX_CLAIM_DEVICES = 10_000
CLAIM_MAX_BYTES = (4 << 10) + MAX_CLAIM_DEVICES * 192


def index_max_bytes(devices: int) -> int:
    """The most an index of a fleet of ``devices`` device records may hold."""
    return INDEX_FLOOR_BYTES + INDEX_DEVICE_BYTES * max(0, devices)


class RecordRefused(StoreError):
    """A record or index read back from the store that the fleet CA did not sign as it is,
    there; ``reason`` (``unsigned``, ``forged``, ``malformed``, ``misplaced``) is the counter's
    label."""

    def __init__(self, key: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.key, self.reason = key, reason


def read_capped(store: ObjectStore, key: str, limit: int) -> tuple[bytes, str]:
    """The object's bytes and etag; RecordRefused (``malformed``) past ``limit`` bytes, of
    which at most one more was read (NotFoundError when it is missing)."""
    try:
        return store.read(key, max_bytes=limit)
    except SizeLimitError as exc:
        shown = key if key.isprintable() else ascii(key)
        raise RecordRefused(
            key, "malformed", f"{shown} is over {limit} bytes: no identity object is that big"
        ) from exc


def device_of(key: str) -> str | None:
    """The device whose record ``key`` is: exactly ``devices/{id}.json``, one level, a valid
    id; None for any other key (a copy under ``devices/zz/``), which is no device's record: a
    signed record copied there must not stand in for the one at its own key."""
    name = key.removeprefix(DEVICES)
    if name == key or not name.endswith(".json"):
        return None
    device = name.removesuffix(".json")
    return device if DEVICE_ID.fullmatch(device) else None


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
    # One more at each write, signed: the CRL written from it carries it as its CRLNumber, so
    # an older index put back is seen below the CRL on disk (``cloud_sync.crl_disk``).
    generation: int = 0
    entries: list[CrlEntry] = Field(default_factory=list)


class RenewalSpend(BaseModel):  # a renewal answered: ``cloud_sync.renewal_budget``
    at: float = Field(allow_inf_nan=False)  # the answering service's clock
    request: str = Field(default="", max_length=64)  # the request's id: a replay spends nothing


class DeviceIdentity(BaseModel):
    schema_version: int = SCHEMA_VERSION
    device: str
    certificates: list[CertRecord] = Field(default_factory=list)
    current: str | None = None  # the serial the device runs with
    # Renewed, not yet shown to be held by the device (``cloud_sync.identity_rotation``).
    pending: list[str] = Field(default_factory=list)
    retired: list[str] = Field(default_factory=list)  # rotated away from: in the CRL
    last_rotation: float | None = None
    revoked: bool = False
    revoked_at: float | None = None
    # Renewals inside the budget's window: the budget follows the device id, not its key.
    renewals: list[RenewalSpend] = Field(default_factory=list, max_length=100)

    def current_record(self) -> CertRecord | None:
        return next((c for c in self.certificates if c.serial == self.current), None)


def retired_entries(doc: DeviceIdentity) -> list[CrlEntry]:
    """What the CRL lists of one device: every certificate once it is revoked, else those it
    rotated away from."""
    at = (doc.revoked_at if doc.revoked else doc.last_rotation) or 0.0
    retired = {c.serial for c in doc.certificates} if doc.revoked else set(doc.retired)
    return [
        CrlEntry(serial=c.serial, revoked_at=at, not_after=c.not_after)
        for c in doc.certificates
        if c.serial in retired
    ]


def crl_serials(entries: list[CrlEntry], now: float) -> list[tuple[int, dt.datetime]]:
    """The CRL's (serial, revocation date) of the entries whose certificates have not expired."""
    return [
        (int(e.serial, 16), dt.datetime.fromtimestamp(e.revoked_at, dt.UTC))
        for e in entries
        if e.not_after > now
    ]


def _message(key: str, body: bytes) -> bytes:
    return DOMAIN + key.encode() + b"\n" + body


def signing_environment(ca: FleetCA) -> str:
    """The environment ``ca`` signs and checks for; ConfigError for the CA itself, so that
    no record or claim is ever signed or read as bound to none."""
    environment = getattr(ca, "environment", None)
    if not isinstance(environment, str):
        raise ConfigError("identity records are signed for a store: IdentityStore(store, ca)")
    return environment


def sign(ca: FleetCA, key: str, body: bytes) -> bytes:
    """``body`` (the JSON object of a record, without a signature or an environment) as stored
    at ``key`` in ``ca``'s environment."""
    environment = signing_environment(ca)
    fields = json.loads(body)
    if not isinstance(fields, dict) or ENVIRONMENT in fields or FIELD in fields:
        raise ValueError(f"{key}: only a record's own fields are signed")
    placed = _append_field(body, ENVIRONMENT, environment)
    return append_mark(placed, ca.sign_record(_message(key, placed)))


def _append_field(body: bytes, name: str, value: str) -> bytes:
    """``body`` (a JSON object) with ``name: value`` appended as its last field."""
    body, field = body.strip(), json.dumps({name: value}, separators=(",", ":")).encode()
    return field if body == b"{}" else body[:-1] + b"," + field[1:]


_TAIL = b',"' + FIELD.encode() + b'":"'


def _split(key: str, data: bytes) -> tuple[bytes | None, object] | None:
    """The signed bytes (None when the object is not laid out as signed) and the signature;
    None when the object carries no signature."""
    at = data.rfind(_TAIL)
    if at > 0 and data.endswith(b'"}'):  # as ``sign`` lays it out: no JSON parse needed
        tail = data[at + len(_TAIL) : -2]
        if tail and b'"' not in tail and b"\\" not in tail:
            return data[:at] + b"}", tail.decode("ascii", "replace")
    try:
        mark = parse(data, key).get(FIELD)
    except StoreError as exc:  # not JSON at all: deep nesting and huge integers included
        raise RecordRefused(key, "malformed", f"{key}: {exc}") from exc
    if mark is None:
        return None
    return signed_part(data, mark), mark


def opened(ca: FleetCA, key: str, data: bytes) -> bytes:
    """The bytes the fleet CA signed for ``key`` in ``ca``'s environment; RecordRefused when
    they were changed, moved from another object or another environment, signed by another key
    or never signed."""
    ours = signing_environment(ca)
    found = _split(key, data)
    if found is None:
        raise RecordRefused(
            key,
            "unsigned",
            f"{key} is not signed by the fleet CA (written by an older release, or by someone "
            f"without the CA's key): refusing to act on it; an operator holding the CA key "
            f"checks and signs old records with `{REPAIR}`",
        )
    body, signature = found
    if (
        body is None
        or not isinstance(signature, str)
        or not ca.verify_record(_message(key, body), signature)
    ):
        raise RecordRefused(
            key,
            "forged",
            f"{key} was changed after the fleet CA signed it, or carries the signature of "
            "another object or another key: refusing to act on it",
        )
    theirs = json.loads(body).get(ENVIRONMENT)
    if theirs != ours:
        raise RecordRefused(
            key,
            "misplaced",
            f"{key} was signed by the fleet CA for the store {clip(json.dumps(theirs))}, not "
            f"for this one ({clip(json.dumps(ours))}): a copy from another environment; "
            "refusing to act on it",
        )
    return body


def carries_signature(key: str, data: bytes) -> bool:
    """Whether the object has a signature field at all (checked or not)."""
    return _split(key, data) is not None


def unchecked(key: str, data: bytes) -> bytes:
    """The record's bytes without their signature, unchecked: for views that act on nothing
    (a record not laid out as signed is read as it is; its models ignore the field)."""
    found = _split(key, data)
    return data if found is None or found[0] is None else found[0]


def salvaged(device: str, key: str, data: bytes, now: float) -> DeviceIdentity:
    """A record refused as read, for its revocation only: the certificates it names (at most
    20, hex serials), each kept listed until the issuing key itself expires since their dates
    are not trusted; nothing else of it. Revoking more than a record says is always safe, so
    what a bucket writer spoiled does not stop the revocation of a stolen device."""
    try:
        listed = untrusted_json.loads(unchecked(key, data), key).get("certificates", [])
    except (untrusted_json.NotJsonError, AttributeError, RecordRefused):
        listed = []
    found: list[CertRecord] = []
    for item in listed if isinstance(listed, list) else []:
        try:
            cert = CertRecord.model_validate(item)
            int(cert.serial, 16)
        except (ValidationError, ValueError, TypeError):
            continue
        if len(cert.serial) <= 40:
            until = max(cert.not_after, now + ISSUING_DAYS * 86400.0)
            found.append(cert.model_copy(update={"not_after": until}))
    return DeviceIdentity(device=device, certificates=found[-20:])
