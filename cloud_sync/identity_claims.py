"""Claim tokens in the store: made and signed by the fleet CA, spent once by an enrollment.

Import path and API (used through ``IdentityStore``, which holds the store and the CA)::

    from cloud_sync.identity_claims import ClaimRefused, new_claim, spend_claim, token_hash
    token = new_claim(store, ca, ["cam-1"], ttl_s=86400, batch=False)
    spent = spend_claim(store, ca, token, "cam-1", record_of, revoked_since=when, held=h)
    # ClaimRefused(reason) unless valid, bound, unused, and not revoked since; a Spent
    # (key_hash, created_at) that record_issue checks again against a revocation since

Only a claim token's SHA-256 is stored (``fleet/identity/claims/{sha256}.json``): whoever reads
the bucket cannot enroll a device with it. A claim is signed by the fleet CA's issuing key (over
its hash, devices, batch flag, times and environment): whoever writes the bucket without that
key cannot plant a claim of its own or widen one. A claim is spent by a compare-and-swap on its
etag: two enrollments racing with one token cannot both win.

A claim is signed for the store it is made in (``environment``, as records are:
``cloud_sync.identity_environment``): one copied from staging into prod, which share the CA, is
refused there (``misplaced_claim``), so the staging token's holder cannot enroll that device id
in prod. Claims made by the previous release carry no environment (their signature covers none);
they are still accepted, with a WARNING, until they expire (24 h by default, ``fleet claim
--ttl``): a copied one of those enrolls until then.

``used`` is outside the signature: where the enrollment host keeps its own list
(``cloud_sync.spent_claims``, beside the broker's CRL), a claim spent, or one that named a device
when it was revoked, is refused for that device whatever ``used`` says in the bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, NamedTuple

from pydantic import BaseModel, Field, ValidationError

from cloud_sync.identity_records import (
    CLAIM_MAX_BYTES,
    MAX_CLAIM_DEVICES,
    SCHEMA_VERSION,
    DeviceIdentity,
    RecordRefused,
    read_capped,
    signing_environment,
)
from cloud_sync.store import ObjectStore
from modelpack.errors import ConfigError, ConflictError, NotFoundError, StoreError, clip

if TYPE_CHECKING:
    from cloud_sync.fleet_ca import FleetCA
    from cloud_sync.spent_claims import Held

log = logging.getLogger(__name__)
CLAIMS = "fleet/identity/claims"
TOKEN_PREFIX = "ebc1."
_TRIES = 20


class ClaimRefused(Exception):
    """A claim or renewal that is refused; ``reason`` is the counter's label, and
    ``retry_after_s`` when asking again later will do (``renewal_budget``)."""

    def __init__(self, reason: str, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.reason, self.retry_after_s = reason, retry_after_s


class ClaimDoc(BaseModel):
    schema_version: int = SCHEMA_VERSION
    devices: list[str]
    batch: bool = False
    expires_at: float
    # A claim made before a device's revocation never re-enrolls it (0: a claim from before
    # this field, as old as any revocation).
    created_at: float = 0.0
    used: dict[str, float] = Field(default_factory=dict)
    # The store it was made for (None: the previous release's, made for any).
    environment: str | None = None
    signature: str | None = None  # FleetCA.sign_record over body(): not ``used``

    def body(self, key_hash: str) -> bytes:
        """What the CA signs: bound to the token's hash, so a signature moved onto another
        token's record does not verify, and to the environment (a claim without one is signed
        as the previous release signed it, so its signature still verifies)."""
        fields: dict[str, object] = {"hash": key_hash, "devices": self.devices}
        fields |= {"batch": self.batch, "expires_at": self.expires_at}
        fields |= {"created_at": self.created_at}
        if self.environment is not None:
            fields["environment"] = self.environment
        return json.dumps(fields, sort_keys=True).encode()


class Spent(NamedTuple):
    """The claim an enrollment was let through with: what ``record_issue`` checks again when
    the record it writes was revoked in between (``fleet revoke`` during the signing)."""

    key_hash: str
    created_at: float


def refusal(ca: FleetCA, key_hash: str, doc: ClaimDoc) -> ClaimRefused | None:
    """Why the claim ``doc`` (at ``key_hash``) is not one the fleet CA made in ``ca``'s
    environment; None when it is (or the previous release made it, without an environment)."""
    if not ca.verify_record(doc.body(key_hash), doc.signature):
        return ClaimRefused("forged_claim", "the claim is not signed by the fleet CA")
    ours = signing_environment(ca)
    if doc.environment is not None and doc.environment != ours:
        return ClaimRefused(
            "misplaced_claim",
            f"the claim token was made for the store {clip(json.dumps(doc.environment))}, not "
            f"this one ({clip(json.dumps(ours))}): a copy from another environment",
        )
    return None


def claims_naming(
    store: ObjectStore, ca: FleetCA, device: str, refused: Counter[tuple[str, str]] | None = None
) -> list[tuple[str, float]]:
    """(hash, expiry) of every unexpired claim the CA made here that names ``device``, spent
    or not (a planted one is left out: it must not grow the host's list). Every claim in the
    store is read, 16 at a time: claims are never deleted. One the store cannot read (a key it
    refuses, a GET that fails) or over ``CLAIM_MAX_BYTES`` is skipped and counted in
    ``refused`` (("claim", reason)), one WARNING for them all: a planted object must not stop a
    revocation."""
    from concurrent.futures import ThreadPoolExecutor

    skipped: list[tuple[str, str]] = []

    def naming(key: str) -> tuple[str, float] | None:
        key_hash = key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            doc = ClaimDoc.model_validate_json(read_capped(store, key, CLAIM_MAX_BYTES)[0])
        except (ValidationError, NotFoundError):
            return None  # not a claim (or gone): it enrolls nothing
        except RecordRefused as exc:
            skipped.append((key, exc.reason))
            return None
        except StoreError as exc:
            skipped.append((key, "unreadable"))
            log.debug("%s: %s", key, exc)
            return None
        alive = device in doc.devices and doc.expires_at > time.time()
        return (key_hash, doc.expires_at) if alive and refusal(ca, key_hash, doc) is None else None

    with ThreadPoolExecutor(16) as pool:
        named = [n for n in pool.map(naming, store.list(f"{CLAIMS}/")) if n is not None]
    if skipped:
        if refused is not None:
            refused.update(("claim", reason) for _, reason in skipped)
        key = skipped[0][0]
        log.warning(
            "%d objects under %s/ skipped as no claim (%s: %s)",
            len(skipped), CLAIMS, key if key.isprintable() else ascii(key), skipped[0][1],
        )  # fmt: skip
    return named


def token_hash(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def new_claim(
    store: ObjectStore, ca: FleetCA, devices: list[str], ttl_s: float, batch: bool
) -> str:
    if ttl_s <= 0:
        raise ConfigError("a claim's ttl must be positive")
    if len(devices) > MAX_CLAIM_DEVICES:  # what a reader takes of it is bounded
        raise ConfigError(f"a claim names at most {MAX_CLAIM_DEVICES} devices: split the batch")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now, key_hash = time.time(), token_hash(token)
    doc = ClaimDoc(devices=devices, batch=batch, expires_at=now + ttl_s, created_at=now)
    doc.environment = signing_environment(ca)
    doc.signature = ca.sign_record(doc.body(key_hash))
    store.create(f"{CLAIMS}/{key_hash}.json", doc.model_dump_json().encode())
    return token


def spend_claim(
    store: ObjectStore,
    ca: FleetCA,
    token: str,
    device: str,
    record_of: Callable[[str], DeviceIdentity | None],
    now: float | None = None,
    revoked_since: Callable[[str], float | None] | None = None,
    held: Callable[[], AbstractContextManager[Held]] | None = None,
) -> Spent:
    """Spend the claim for ``device``; ``record_of`` gives its checked record (or refuses),
    ``revoked_since`` when the CRL the broker reads says it was last revoked (its ledger,
    ``cloud_sync.crl_disk``): a claim issued before either revocation is refused, so neither
    an older record put back nor a record deleted lets a spare claim undo a revocation.
    ``held``: the enrollment host's list of spent and revoked claims (``spent_claims``), held
    from the check to the write, so that one spent here is never spent again."""
    key_hash = token_hash(token)
    try:
        with held() if held is not None else nullcontext() as listed:
            return _spend(store, ca, key_hash, device, record_of, now, revoked_since, listed)
    except ConfigError as exc:  # the list does not read: fail closed, nothing spent on trust
        log.error("%s", exc)
        raise ClaimRefused("record_refused", f"{device}'s claim is not checked: {exc}") from exc


def _spend(
    store: ObjectStore,
    ca: FleetCA,
    key_hash: str,
    device: str,
    record_of: Callable[[str], DeviceIdentity | None],
    now: float | None,
    revoked_since: Callable[[str], float | None] | None,
    listed: Held | None,
) -> Spent:
    key = f"{CLAIMS}/{key_hash}.json"
    for _ in range(_TRIES):
        try:
            data, etag = read_capped(store, key, CLAIM_MAX_BYTES)
            doc = ClaimDoc.model_validate_json(data)
        except NotFoundError:
            raise ClaimRefused("unknown_token", "no such claim token") from None
        except RecordRefused as exc:
            raise ClaimRefused("malformed_claim", str(exc)) from exc
        except ValidationError as exc:
            raise ClaimRefused("malformed_claim", f"{key} in {store.url} is not a claim") from exc
        refused = refusal(ca, key_hash, doc)
        if refused is not None:
            raise refused
        if (now or time.time()) >= doc.expires_at:
            raise ClaimRefused("expired_token", "the claim token has expired")
        if doc.environment is None:
            log.warning(
                "%s: a claim of the previous release, bound to no store: accepted until it expires",
                key,
            )
        if device not in doc.devices:
            raise ClaimRefused("wrong_device", f"the claim token is not for {device}")
        if device in doc.used or (doc.used and not doc.batch):
            raise ClaimRefused("token_reused", "the claim token was already used")
        record = record_of(device)
        revoked = [] if revoked_since is None else [revoked_since(device)]
        if record is not None and record.revoked:
            revoked.append(record.revoked_at or 0.0)
        last = max((at for at in revoked if at is not None), default=None)
        if last is not None and doc.created_at <= last:
            # A spare token from before a revocation (a stolen device) must not undo it.
            raise ClaimRefused(
                "revoked", f"{device} was revoked after this claim was issued: make a new one"
            )
        # After the record's checks (their reasons say more: an older record put back).
        if (why := None if listed is None else listed.why_not(key_hash, device)) is not None:
            raise ClaimRefused(
                "revoked" if why == "revoked" else "token_reused",
                f"the claim token was already used by {device}"
                if why == "spent"
                else f"{device} was revoked while this claim existed: make a new one",
            )
        doc.used[device] = time.time()
        # Listed before the bucket says used (and taken off if that write does not happen): a
        # list that cannot be written (a full disk) refuses with nothing spent, retryable; it
        # never leaves the claim used in the bucket and the device refused token_reused.
        if listed is not None:
            try:
                listed.add(device, "spent", [(key_hash, doc.expires_at)])
            except OSError as exc:
                raise ConfigError(
                    f"{listed.path}: the spent claims cannot be written: {exc}"
                ) from exc
        try:
            store.replace(key, doc.model_dump_json().encode(), etag)
        except BaseException as exc:
            if listed is not None:
                try:
                    listed.remove(key_hash, device)
                except OSError as err:  # listed spent for the device while the bucket is not
                    log.error("%s: %s stays listed as spent: %s", listed.path, key_hash, err)
            if isinstance(exc, ConflictError):
                continue  # another enrollment spent it or another device of the batch: re-read
            raise
        return Spent(key_hash, doc.created_at)
    raise StoreError(f"{key}: too many concurrent changes")
