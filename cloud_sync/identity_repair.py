"""Sign an older release's device records, and rebuild the CRL's index from what the CA signed.

Import path and API::

    from cloud_sync.identity_repair import repair
    report = repair(IdentityStore(store, ca), crl_path)   # ``edgebento fleet identity-repair``
    report.signed, report.refused, report.index_entries

Records of the release before records were signed carry no signature, and the cloud refuses
them (``cloud_sync.identity_records``). An operator holding the CA key runs this once after the
upgrade (and after an attack, to rebuild the index). Unsigned records are signed only as that
one-time upgrade: once any record or the index is signed, or the CRL was written from a signed
index, an unsigned record is a bucket writer's plant and is left (unless ``sign_unsigned``).
Nothing unsigned is signed on trust alone:
the record's certificates are not in the store, so an old record is checked against what the CA
did sign. It is signed only if

- it names the certificate the device runs with (a claim names a device, not a certificate),
- a claim the CA signed names the device (an operator meant it to enroll: a record planted for
  any other id is refused), and
- the CRL on disk, which the CA signed, does not list the certificate the record says the
  device runs with unless the record says it is revoked (a revocation cleared in the bucket
  is refused), nor name the device in its ledger as revoked unless the record says so (a
  record planted to say "not revoked" for a device whose certificates have left the CRL since,
  or one made up with a serial never issued: the releases that keep the ledger sign every
  record they write, so an unsigned one is never a re-enrollment after that revocation).

A record that carries a signature that does not verify (changed, or moved from another device's
object) is left as it is and reported: delete it and issue a new claim, or revoke the device's
certificate with ``fleet revoke --cert``. The index is then written afresh, signed: every entry
of the signed records, every entry of the old index if the CA signed it (one put back too: it
lists what was revoked then), and every certificate the CRL on disk lists, until the notAfter
its ledger gives (``cloud_sync.crl_disk``; one of a CRL from before the ledger until the issuing
certificate expires). So a revocation that no device's record holds (``fleet revoke --cert`` of
the claim certificate) survives an index deleted, edited or put back. Each certificate is kept
until the latest notAfter any of them gives; entries of expired certificates leave. An edited
index adds nothing of its own: adding only ever revokes more, but a bucket writer must not
revoke a healthy device's certificate by listing it there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from cloud_sync.crl_disk import read_disk_crl
from cloud_sync.identity_claims import CLAIMS, ClaimDoc, refusal
from cloud_sync.identity_records import (
    CLAIM_MAX_BYTES,
    RECORD_MAX_BYTES,
    CrlEntry,
    CrlIndex,
    DeviceIdentity,
    RecordRefused,
    carries_signature,
    device_of,
    opened,
    read_capped,
    retired_entries,
    sign,
    unchecked,
)
from cloud_sync.identity_store import CRL_INDEX, ROOT, IdentityStore
from modelpack.errors import NotFoundError


@dataclass
class RepairReport:
    signed: list[str] = field(default_factory=list)  # old records, checked and signed now
    verified: int = 0  # records already signed
    refused: dict[str, str] = field(default_factory=dict)  # device: why it was left unsigned
    index_entries: int = 0


def _crl(
    ids: IdentityStore, crl_path: Path
) -> tuple[list[CrlEntry], list[CrlEntry], int, dict[str, float]]:
    """The CA-signed CRL on disk: its entries whose notAfter its ledger gives, those it does
    not (a CRL from before the ledger: until the issuing certificate expires, unless the
    records or the index say when), its number, and its ledger's revoked devices (when)."""
    ca = ids.signer()
    disk, unknown = read_disk_crl(ca, crl_path), ca.cert.not_valid_after_utc.timestamp()
    known: list[CrlEntry] = []
    guessed: list[CrlEntry] = []
    for serial, at in disk.entries.items():
        until = disk.not_after.get(serial)
        entry = CrlEntry(
            serial=format(serial, "x"), revoked_at=at.timestamp(), not_after=until or unknown
        )
        (guessed if until is None else known).append(entry)
    return known, guessed, disk.number, dict(disk.devices)


def _claimed(ids: IdentityStore) -> set[str]:
    """Every device that a claim signed by the CA names."""
    ca, named = ids.signer(), set()
    for key in ids.store.list(f"{CLAIMS}/"):
        try:
            doc = ClaimDoc.model_validate_json(read_capped(ids.store, key, CLAIM_MAX_BYTES)[0])
        except (ValidationError, RecordRefused, NotFoundError):
            continue
        key_hash = key.rsplit("/", 1)[-1].removesuffix(".json")
        if refusal(ca, key_hash, doc) is None:  # the CA's, made for this store
            named.update(doc.devices)
    return named


def _records(ids: IdentityStore, report: RepairReport) -> dict[str, bytes]:
    """Every object under devices/, each read up to RECORD_MAX_BYTES: a bigger one is left as
    it is and reported."""
    objects: dict[str, bytes] = {}
    keys = ids.store.list(f"{ROOT}/devices/")
    ids.fleet_size = len(keys)
    for key in keys:
        try:
            objects[key] = ids.read_object(key, "device", RECORD_MAX_BYTES)[0]
        except RecordRefused as exc:
            report.refused[device_of(key) or key] = str(exc)
        except NotFoundError:
            continue  # deleted since listed
    return objects


def _as_written(key: str, data: bytes) -> DeviceIdentity:
    """A record as it reads, its signature (if any) unchecked."""
    try:
        return DeviceIdentity.model_validate_json(unchecked(key, data))
    except ValidationError as exc:
        raise RecordRefused(key, "malformed", f"{key} is not a device identity record") from exc


def _why_not(
    doc: DeviceIdentity,
    device: str,
    claimed: set[str],
    crl: dict[str, float],
    ledger: dict[str, float],
) -> str:
    if doc.device != device:
        return f"it names device {doc.device!r}"
    if doc.current_record() is None:  # a claim names the device, not what it runs with
        return "it names no certificate the device runs with"
    if device not in claimed:
        return "no claim signed by the fleet CA names this device"
    if doc.current in crl and not doc.revoked:
        return f"the CRL lists its current certificate {doc.current} but it says not revoked"
    # Not as acting_on reads a signed record (by its certificates' issued_at, which whoever
    # wrote an unsigned one chose): a release that keeps the ledger signs every record it
    # writes, so no unsigned record is a claim's re-enrollment after a revocation there.
    if not doc.revoked and (at := ledger.get(device)) is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
        return f"it says not revoked, but the CRL's ledger says revoked at {when} UTC"
    return ""


def _signed(key: str, data: bytes) -> bool:
    try:
        return carries_signature(key, data)
    except RecordRefused:
        return False


def _upgraded_already(ids: IdentityStore, objects: dict[str, bytes], number: int) -> str:
    """Why unsigned records are no upgrade's (empty when they may be): the upgrade is signed
    once, and after it an unsigned record is a bucket writer's plant."""
    if number > 0:
        return "the CRL was written from a signed index (its CRLNumber)"
    try:
        if _signed(CRL_INDEX, ids.read_index()[0]):
            return f"{CRL_INDEX} is signed"
    except (NotFoundError, RecordRefused):
        pass
    signed = next((k for k, data in objects.items() if _signed(k, data)), None)
    return f"{signed} is signed" if signed else ""


def repair(ids: IdentityStore, crl_path: Path, sign_unsigned: bool = False) -> RepairReport:
    """``sign_unsigned``: sign unsigned records that pass the checks even after the upgrade
    (``--sign-unsigned``, an operator who has checked them)."""
    ca, report = ids.signer(), RepairReport()
    (on_disk, guessed, number, ledger), claimed = _crl(ids, crl_path), _claimed(ids)
    crl = {e.serial: e.revoked_at for e in [*on_disk, *guessed]}
    objects = _records(ids, report)
    done = "" if sign_unsigned else _upgraded_already(ids, objects, number)
    for key, data in objects.items():
        device = device_of(key)
        if device is None:
            report.refused[key] = f"{key} is no device's record key: left as it is"
            continue
        try:
            doc = _as_written(key, data)
        except RecordRefused as exc:
            report.refused[device] = str(exc)
            continue
        if carries_signature(key, data):
            continue  # signed: checked with the others below; never signed again here
        why = _why_not(doc, device, claimed, crl, ledger)
        if done and not why:
            why = f"not an upgrade ({done}): --sign-unsigned if you checked it"
        if why:
            report.refused[device] = f"{key} left unsigned: {why}"
            continue
        ids.store.put_bytes(key, sign(ca, key, doc.model_dump_json().encode()))
        report.signed.append(device)
    records = ids.devices()  # every record that verifies now
    report.verified = len(records) - len(report.signed)
    for device, reason in ids.refused_records.items():
        report.refused.setdefault(device, f"{ROOT}/devices/{device}.json: {reason}")
    old, generation = _old_index(ids)
    found = [e for doc in records.values() for e in retired_entries(doc)] + old + on_disk
    now, kept = time.time(), dict[str, CrlEntry]()
    for entry in found:  # each listed until the latest notAfter given for it
        held = kept.get(entry.serial)
        if entry.not_after > max(now, held.not_after if held else 0.0):
            kept[entry.serial] = entry
    for entry in guessed:  # nothing else says when these expire
        kept.setdefault(entry.serial, entry)
    # Above the CRL's number and the old index's: the CRL writers take it from now on.
    index = CrlIndex(generation=max(number, generation) + 1, entries=list(kept.values()))
    ids.store.put_bytes(CRL_INDEX, sign(ca, CRL_INDEX, index.model_dump_json().encode()))
    report.index_entries = len(index.entries)
    return report


def _old_index(ids: IdentityStore) -> tuple[list[CrlEntry], int]:
    """The entries of the index there now if the CA signed it (none otherwise: the CRL on disk
    lists what it revoked), and its generation (0 unless signed)."""
    try:
        data = ids.read_index()[0]
        index = CrlIndex.model_validate_json(opened(ids.signer(), CRL_INDEX, data))
        return index.entries, index.generation
    except (NotFoundError, RecordRefused, ValidationError):
        return [], 0
