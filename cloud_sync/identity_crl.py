"""The CRL's index in the store (``fleet/identity/crl.json``), signed by the fleet CA: what
``cloud_sync.identity_store.IdentityStore`` adds to as certificates are retired or revoked,
and what the CRL writer (``cloud_sync.revocation.publish_crl``) reads.

Import path and API (through IdentityStore, which is a CrlIndexWriter)::

    ids.revoke_serial(serial, not_after)    # a certificate that is no device's
    ids.crl_index()                         # CrlIndex; RecordRefused unless the CA signed it
    ids.revoked_serials()                   # [(serial, revocation date)] the CRL lists
    ids.fold_records()                      # the signed records' entries in; revoked devices

Each write is a compare-and-swap, signed, one ``generation`` above the index it replaces
(``cloud_sync.crl_disk``: an older index put back is seen below the CRL on disk).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from cloud_sync.identity_records import (
    CrlEntry,
    CrlIndex,
    DeviceIdentity,
    RecordRefused,
    crl_serials,
    index_max_bytes,
    read_capped,
    retired_entries,
    sign,
)
from cloud_sync.store import ObjectStore
from modelpack.errors import ConflictError, NotFoundError, StoreError

if TYPE_CHECKING:
    from cloud_sync.fleet_ca import FleetCA

log = logging.getLogger(__name__)
ROOT = "fleet/identity"
CRL_INDEX = f"{ROOT}/crl.json"
TRIES = 20


class CrlIndexWriter:
    store: ObjectStore

    fleet_size: int  # device records last counted

    if TYPE_CHECKING:  # IdentityStore's

        def signer(self) -> FleetCA: ...
        def read_object(self, key: str, kind: str, limit: int) -> tuple[bytes, str]: ...
        def _open(self, key: str, data: bytes, kind: str) -> bytes: ...
        def devices(self) -> dict[str, DeviceIdentity]: ...
        def settle_overdue(self, docs: dict[str, DeviceIdentity]) -> dict[str, DeviceIdentity]: ...

    def revoke_serial(self, serial: int, not_after: float) -> None:
        """Into the CRL until it expires: a certificate that is no device's (the claim's)."""
        entry = CrlEntry(serial=format(serial, "x"), revoked_at=time.time(), not_after=not_after)
        self._add_to_crl([entry])

    def _add_to_crl(self, entries: list[CrlEntry]) -> None:
        """Into the index. One that does not verify is left as it is (an ERROR): the CRL
        writer then goes by the signed device records, which hold a device's entries, and
        ``revoke_device`` / ``revoke_certificate`` hand it the revocation at hand."""
        if not entries:
            return
        try:
            self._change_crl(lambda index: [*index.entries, *entries])
        except RecordRefused as exc:
            log.error("%s; the CRL is written from the signed device records until then", exc)

    def _change_crl(self, change: Any) -> CrlIndex:
        """Compare-and-swap on the index; entries of expired certificates are dropped.
        RecordRefused when the index does not verify: nothing is written over it."""
        key, ca = CRL_INDEX, self.signer()
        for _ in range(TRIES):
            try:
                data, etag = self.read_index()
                index: CrlIndex | None = CrlIndex.model_validate_json(
                    self._open(key, data, "crl_index")
                )
            except NotFoundError:
                index, etag = None, ""
            except ValidationError as exc:
                raise StoreError(f"{key} in {self.store.url} is not a CRL index") from exc
            now = time.time()
            kept: dict[str, CrlEntry] = {}
            for entry in change(index or self.index_from_records()):
                if entry.not_after > now and entry.serial not in kept:
                    kept[entry.serial] = entry
            generation = (index.generation if index is not None else 0) + 1
            new = CrlIndex(generation=generation, entries=list(kept.values()))
            if index is not None and new.entries == index.entries:
                return index  # nothing added, nothing expired: no write
            if self._write_signed(ca, key, new, None if index is None else etag):
                return new
        raise StoreError(f"{key}: too many concurrent changes")

    def read_index(self) -> tuple[bytes, str]:
        """The index's bytes and etag, up to ``index_max_bytes`` of the fleet: the size last
        counted, and past it the device records counted again (one listing) before the index
        is refused as malformed (counted)."""
        try:
            return read_capped(self.store, CRL_INDEX, index_max_bytes(self.fleet_size))
        except RecordRefused:
            self.fleet_size = len(self.store.list(f"{ROOT}/devices/"))
        return self.read_object(CRL_INDEX, "crl_index", index_max_bytes(self.fleet_size))

    def _write_signed(self, ca: FleetCA, key: str, doc: BaseModel, etag: str | None) -> bool:
        """``doc`` signed and written at ``key``: created where ``etag`` is None, else replacing
        the object read with that etag; False when another writer came first (read again)."""
        body = sign(ca, key, doc.model_dump_json().encode())
        try:
            if etag is None:
                self.store.create(key, body)
            else:
                self.store.replace(key, body, etag)
        except ConflictError:
            return False
        return True

    def index_from_records(self) -> CrlIndex:
        """The index from every device's record that verifies: for a store from before the
        index existed (once), and for the CRL writer while the index does not verify."""
        return CrlIndex(entries=[e for d in self.devices().values() for e in retired_entries(d)])

    def fold_records(self) -> dict[str, float]:
        """Every signed record's retired and revoked certificates into the index, so that one a
        crash (or a failing store) kept out of it, between the record's write and the index's,
        comes back; the revoked devices, with when. A renewal left unconfirmed past the grace
        is settled first (``cloud_sync.identity_rotation``). It reads every record: the CRL refresh's,
        not each rotation's (``cloud_sync.crl_publish``)."""
        docs = self.settle_overdue(self.devices())
        self._add_to_crl([e for doc in docs.values() for e in retired_entries(doc)])
        return {d: doc.revoked_at for d, doc in docs.items() if doc.revoked and doc.revoked_at}

    def crl_index(self) -> CrlIndex:
        """The index: every unexpired certificate of a revoked device, and those a device
        rotated away from. One read, whatever the size of the fleet; RecordRefused when it does
        not verify (``publish_crl`` keeps its CRL then)."""
        return self._change_crl(lambda index: index.entries)  # prunes; built once if absent

    def revoked_serials(self) -> list[tuple[int, dt.datetime]]:
        """What the CRL lists, from the index (``crl_index``)."""
        return crl_serials(self.crl_index().entries, time.time())
