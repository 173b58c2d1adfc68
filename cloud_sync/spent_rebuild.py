"""The enrollment host's list of spent claims (``cloud_sync.spent_claims``) rebuilt from the
bucket and the broker's CRL, when it is damaged or lost (``edgebento fleet rebuild-spent-claims``).

Import path and API::

    from cloud_sync.spent_rebuild import rebuild_spent
    report = rebuild_spent(IdentityStore(store, ca, crl_file))   # a RebuildReport

Why: a list that does not read refuses every claim (fail closed), and writing ``{"v":1}`` over
it forgets which claims were spent, so whoever can clear a claim's ``used`` in the bucket (it
is outside the signature) could spend it again. The list holds two things, and the bucket and
the CRL tell both, failing closed where they cannot:

- ``spent``: a claim spent for a device. Every unexpired claim the fleet CA made here is listed
  as spent for each device it names that has a record and is not revoked (enrolled: it needs no
  claim; one made after its enrollment is lost with the list, and the operator makes a new
  one), for each device the claim's ``used`` names (the bucket can only add spends there, which
  is safe), and for each device whose record does not verify (what it says is not known).
- ``revoked``: a claim that named a device when it was revoked (``IdentityStore._void_claims``).
  The revocation time is the later of the signed record's and the broker CRL's ledger (which
  a bucket writer cannot change), and a claim made up to ``skew_s`` after it is voided too: a
  claim made on a host whose clock ran fast, before the revocation, reads as made after it.

A device whose record was deleted and that the CRL's ledger does not name looks never enrolled:
its claims are left unlisted (nothing in the bucket or the CRL says otherwise). A claim the store
fails to read stops the rebuild (run it again): its devices are not known. Only keys of the form
the CA writes claims under (``claims/{sha256 hex}.json``) are read: any other (a key the store
refuses, planted by a bucket writer) is skipped and counted, as ``fleet revoke`` does, and so
is one that is not a claim the CA made here (planted, malformed, too big: refused at enrollment
anyway). Each claim's signature is checked as it is read and only what the rebuild needs is
kept, so planted objects near ``CLAIM_MAX_BYTES`` do not all sit in memory at once.
The rebuilt entries are joined with what the list holds where it still reads; a damaged one is
kept beside it as ``{list}.damaged``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from pydantic import ValidationError

from cloud_sync.identity_claims import CLAIMS, ClaimDoc, refusal
from cloud_sync.identity_records import CLAIM_MAX_BYTES, RecordRefused, read_capped
from cloud_sync.spent_claims import PRUNE_MARGIN_S, Why
from modelpack.errors import ConfigError, NotFoundError, StoreError

if TYPE_CHECKING:
    from cloud_sync.fleet_ca import FleetCA
    from cloud_sync.identity_store import IdentityStore

SKEW_S = 3600.0  # claims made up to an hour after a revocation are voided with it
# ``create_claims`` writes each claim at the sha256 of its token: nothing else is one.
CLAIM_KEY = re.compile(rf"{re.escape(CLAIMS)}/(?P<hash>[0-9a-f]{{64}})\.json")
SHOWN_SKIPPED = 20  # the report names this many skipped keys; ``skipped_count`` counts all


class _Claim(NamedTuple):
    """What the rebuild keeps of one claim the CA made here."""

    key_hash: str
    devices: tuple[str, ...]
    used: frozenset[str]
    created_at: float
    expires_at: float


@dataclass
class RebuildReport:
    path: str
    spent: int = 0  # (claim, device) pairs listed as spent
    revoked: int = 0  # and as voided by a revocation
    claims: int = 0  # claims the CA made here, read
    skipped: list[str] = field(default_factory=list)  # objects that are no claim of ours
    skipped_count: int = 0  # all of them (``skipped`` names the first SHOWN_SKIPPED)
    unknown_devices: list[str] = field(default_factory=list)  # records that do not verify
    damaged: str | None = None  # where the list that did not read was kept


def rebuild_spent(ids: IdentityStore, skew_s: float = SKEW_S) -> RebuildReport:
    """Rebuild the list beside ``ids``' CRL (see the module's docstring); ConfigError when the
    CRL or a claim cannot be read."""
    from concurrent.futures import ThreadPoolExecutor

    ca = ids.signer()
    if ids.crl is None or ids.spent is None:
        raise ConfigError("the spent claims are rebuilt beside the broker's CRL: --crl-file")
    ledger = ids.crl.read().devices  # ConfigError when it does not verify: fix that first
    records = ids.devices()
    unknown = set(ids.refused_records)
    report = RebuildReport(str(ids.spent.path), unknown_devices=sorted(unknown))
    entries: dict[str, tuple[Why, float]] = {}
    now = time.time()
    with ThreadPoolExecutor(16) as pool:  # every claim is read: they are never deleted
        read = list(pool.map(lambda key: _claim(ids, ca, key), ids.store.list(f"{CLAIMS}/")))
    for key, doc in read:
        if doc is None:
            report.skipped_count += 1
            if len(report.skipped) < SHOWN_SKIPPED:
                report.skipped.append(key if key.isprintable() else ascii(key))
            continue
        if doc.expires_at + PRUNE_MARGIN_S <= now:
            continue  # past what the list keeps: refused as expired anyway
        report.claims += 1
        key_hash = doc.key_hash
        for device in doc.devices:
            record = records.get(device)
            revoked = [ledger.get(device)]
            if record is not None and record.revoked:
                revoked.append(record.revoked_at or now)
            last = max((at for at in revoked if at is not None), default=None)
            enrolled = record is not None and not record.revoked
            why: Why | None = None
            if last is not None and doc.created_at <= last + skew_s:
                why = "revoked"
            elif enrolled or device in unknown or device in doc.used:
                why = "spent"
            if why is not None:
                entries[f"{key_hash}:{device}"] = (why, doc.expires_at)
    damaged = ids.spent.rebuild(entries)
    report.damaged = None if damaged is None else str(damaged)
    report.spent = sum(1 for why, _ in entries.values() if why == "spent")
    report.revoked = len(entries) - report.spent
    return report


def _claim(ids: IdentityStore, ca: FleetCA, key: str) -> tuple[str, _Claim | None]:
    """What the rebuild needs of the claim at ``key``; None for a key the CA writes no claim
    under and for an object that is no claim the CA made here (planted, malformed, too big,
    unsigned: refused at enrollment too); ConfigError when the store fails to read a claim's
    key (its devices are not known: nothing is written)."""
    found = CLAIM_KEY.fullmatch(key)
    if found is None:
        return key, None
    try:
        doc = ClaimDoc.model_validate_json(read_capped(ids.store, key, CLAIM_MAX_BYTES)[0])
    except (ValidationError, RecordRefused, NotFoundError):
        return key, None
    except StoreError as exc:
        raise ConfigError(f"{key} cannot be read: {exc}; nothing was written, run again") from exc
    if refusal(ca, found["hash"], doc) is not None:
        return key, None
    kept = _Claim(
        found["hash"], tuple(doc.devices), frozenset(doc.used), doc.created_at, doc.expires_at
    )
    return key, kept
