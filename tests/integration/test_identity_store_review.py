"""A bucket writer without the CA's key, after review 2 of the signed identity records: a copy
under another key, an unreadable CRL, a record spoiled before a revocation, an older signed
index put back, an unsigned record planted for repair to sign. The store is a bucket on moto's
S3 server, the enrollment service answers over Mosquitto with mTLS, the CRL is what the broker
reads."""

from __future__ import annotations

import json
from pathlib import Path

from cloud_sync.fleet_ca import new_key
from cloud_sync.identity_records import retired_entries
from cloud_sync.identity_repair import repair
from cloud_sync.identity_store import CRL_INDEX
from cloud_sync.revocation import revoke_device
from edge_agent.identity import KeyMaker
from tests.integration.test_identity_store_writer import (  # the same fleet, its own bucket
    _broker,
    _claim,
    _cli,
    _connects,
    _edit,
    _enroll,
    _enrolled_with_a_spare,
    _key,
    idfleet,
)
from tests.support.identity_fleet import IdentityFleet, claim_request

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


def test_a_crl_that_cannot_be_read_refuses_records_instead_of_skipping_the_check(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    spare = _enrolled_with_a_spare(idfleet, "torn-a", tmp_path)
    before = idfleet.ids.store.get_bytes(_key("torn-a"))
    pid, broker = _broker(idfleet)
    revoke_device(idfleet.ids, idfleet.ca, "torn-a", idfleet.ca.paths.crl, pid, broker)
    idfleet.ids.store.put_bytes(_key("torn-a"), before)  # the older signed record put back
    good = idfleet.ca.paths.crl.read_bytes()
    idfleet.ca.paths.crl.write_bytes(good[: len(good) // 2])  # a torn write: unreadable
    try:
        answer = _claim(idfleet, "torn-a", spare)  # record_refused, not enrolled again
    finally:
        idfleet.ca.paths.crl.write_bytes(good)
    assert "cannot be read" in answer["error"]
    # Once the CRL reads again, the check is back: the record put back is still refused.
    again = idfleet.ask_claim("torn-a", claim_request(KeyMaker().csr(new_key(), "torn-a"), spare))
    assert (again["ok"], again["reason"]) == (False, "record_refused"), again


def test_a_device_whose_record_a_bucket_writer_spoiled_or_deleted_can_still_be_revoked(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    spare = _enrolled_with_a_spare(idfleet, "spoil-a", tmp_path)
    files = tmp_path / "spoil-a"
    serial = json.loads(idfleet.ids.store.get_bytes(_key("spoil-a")))["current"]
    _edit(idfleet, _key("spoil-a"), lambda doc: doc.update(revoked=0))  # refused as forged
    pid, broker = _broker(idfleet)
    doc, _ = revoke_device(idfleet.ids, idfleet.ca, "spoil-a", idfleet.ca.paths.crl, pid, broker)
    assert doc.revoked and serial in [c.serial for c in doc.certificates]
    assert not _connects(idfleet, files)  # the certificate the spoiled record named is listed
    signed = idfleet.ids.device("spoil-a")  # a fresh record, signed by the CA: revoked
    assert signed is not None and signed.revoked
    # Deleted before the revocation: a revoked record of no certificate is written, so a claim
    # issued before it is refused; the certificate itself is revoked by its serial.
    idfleet.ids.store.delete(_key("spoil-a"))
    idfleet.ids.store.delete(CRL_INDEX)  # and its serial gone from the index
    revoke_device(idfleet.ids, idfleet.ca, "spoil-a", idfleet.ca.paths.crl, pid, broker)
    tomb = idfleet.ids.device("spoil-a")
    assert tomb is not None and tomb.revoked and tomb.certificates == []
    answer = idfleet.ask_claim(
        "spoil-a", claim_request(KeyMaker().csr(new_key(), "spoil-a"), spare)
    )
    assert (answer["ok"], answer["reason"]) == (False, "revoked"), answer
    url, endpoint = idfleet.store_url, idfleet.endpoint_url
    assert url is not None and endpoint is not None
    done = _cli(
        "fleet", "revoke", "--serial", serial, "--ca", str(idfleet.root / "ca"),
        "--crl-file", str(idfleet.ca.paths.crl), "--broker-pid", str(pid),
        "--broker", f"mqtts://127.0.0.1:{broker[1]}", "--store", url, "--endpoint-url", endpoint,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["serial"] == serial
    assert int(serial, 16) in idfleet.ca.crl_entries(idfleet.ca.paths.crl)
    index = json.loads(idfleet.ids.store.get_bytes(CRL_INDEX))["entries"]
    assert serial in [e["serial"] for e in index]
    assert not _connects(idfleet, files)
