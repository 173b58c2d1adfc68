"""A bucket writer without the CA's key, after review 2 of the signed identity records: a copy
under another key, an unreadable CRL, a record spoiled before a revocation, an older signed
index put back, an unsigned record planted for repair to sign. The store is a bucket on moto's
S3 server, the enrollment service answers over Mosquitto with mTLS, the CRL is what the broker
reads."""

from __future__ import annotations

from pathlib import Path

from cloud_sync.identity_records import retired_entries
from cloud_sync.identity_repair import repair
from cloud_sync.revocation import revoke_device
from tests.integration.test_identity_store_writer import (  # the same fleet, its own bucket
    _broker,
    _enroll,
    _key,
    idfleet,
)
from tests.support.identity_fleet import IdentityFleet

__all__ = ["idfleet"]


def test_a_signed_record_copied_under_a_nested_key_is_refused_not_read_as_the_device(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    _enroll(idfleet, "nest-a", tmp_path)
    before = idfleet.ids.store.get_bytes(_key("nest-a"))  # signed, not revoked
    pid, broker = _broker(idfleet)
    revoke_device(idfleet.ids, idfleet.ca, "nest-a", idfleet.ca.paths.crl, pid, broker)
    copy = "fleet/identity/devices/zz/nest-a.json"
    idfleet.ids.store.put_bytes(copy, before)
    try:
        refused = idfleet.ids.refused[("device", "misplaced")]
        docs = idfleet.ids.devices()
        assert docs["nest-a"].revoked is True  # its own record, not the copy
        assert idfleet.ids.refused_records[copy] == "misplaced"
        assert idfleet.ids.refused[("device", "misplaced")] == refused + 1
        serials = {e.serial for d in docs.values() for e in retired_entries(d)}
        assert docs["nest-a"].current in serials
        report = repair(idfleet.ids, idfleet.ca.paths.crl)
        assert copy in report.refused
        assert idfleet.ids.store.get_bytes(copy) == before  # left as it is, never signed
    finally:
        idfleet.ids.store.delete(copy)

