"""A bucket writer without the CA's key, after review 2 of the signed identity records: a copy
under another key, an unreadable CRL, a record spoiled before a revocation, an older signed
index put back, an unsigned record planted for repair to sign. The store is a bucket on moto's
S3 server, the enrollment service answers over Mosquitto with mTLS, the CRL is what the broker
reads."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.crl_disk import last_good, read_disk_crl
from cloud_sync.fleet_ca import new_key
from cloud_sync.identity_records import RecordRefused, retired_entries
from cloud_sync.identity_repair import repair
from cloud_sync.identity_store import CRL_INDEX
from cloud_sync.revocation import revoke_device
from edge_agent.identity import KeyMaker
from modelpack.errors import ConfigError
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


def _listed(fleet: IdentityFleet) -> set[int]:
    return set(fleet.ca.crl_entries(fleet.ca.paths.crl))


def test_an_older_signed_index_put_back_is_refused_below_the_crl_number(
    idfleet: IdentityFleet, tmp_path: Path, caplog: Any
) -> None:
    _enroll(idfleet, "gen-old", tmp_path)
    pid, broker = _broker(idfleet)
    revoke_device(idfleet.ids, idfleet.ca, "gen-old", idfleet.ca.paths.crl, pid, broker)
    older = idfleet.ids.store.get_bytes(CRL_INDEX)  # signed, without gen-a's revocation
    files = _enroll(idfleet, "gen-a", tmp_path)
    revoke_device(idfleet.ids, idfleet.ca, "gen-a", idfleet.ca.paths.crl, pid, broker)
    serial = int(json.loads(idfleet.ids.store.get_bytes(_key("gen-a")))["current"], 16)
    idfleet.ids.store.put_bytes(CRL_INDEX, older)  # verifies: the CA signed it
    # The CRL on disk as it stands once gen-a's revocation is older than the writer keeps
    # entries for their age alone (re-dated, its number kept, signed by the CA).
    disk = read_disk_crl(idfleet.ca, idfleet.ca.paths.crl)
    assert disk.number > json.loads(older)["generation"]
    aged = {s: at - dt.timedelta(days=400) for s, at in disk.entries.items()}
    idfleet.ca.paths.crl.write_bytes(idfleet.ca.crl(sorted(aged.items()), number=disk.number))
    refused = idfleet.ids.refused[("crl_index", "replayed")]
    with caplog.at_level(logging.ERROR, logger="cloud_sync.revocation"):
        idfleet.publish_crl()
    assert idfleet.ids.refused[("crl_index", "replayed")] == refused + 1
    assert any("older signed index" in r.getMessage() for r in caplog.records)
    assert serial in _listed(idfleet)  # the whole CRL on disk kept
    assert read_disk_crl(idfleet.ca, idfleet.ca.paths.crl).number == disk.number + 1
    # The next revocation signs that older index one generation on: still below the CRL's.
    _enroll(idfleet, "gen-b", tmp_path)
    revoke_device(idfleet.ids, idfleet.ca, "gen-b", idfleet.ca.paths.crl, pid, broker)
    assert serial in _listed(idfleet) and not _connects(idfleet, files)
    assert idfleet.ids.refused[("crl_index", "replayed")] >= refused + 2
    # identity-repair rebuilds the index above the CRL's number: taken again, nothing lost.
    repair(idfleet.ids, idfleet.ca.paths.crl)
    replayed = idfleet.ids.refused[("crl_index", "replayed")]
    idfleet.publish_crl()
    assert idfleet.ids.refused[("crl_index", "replayed")] == replayed
    assert serial in _listed(idfleet)


def test_with_no_crl_on_disk_the_writer_writes_none_from_the_store_alone(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    files = _enroll(idfleet, "lost-a", tmp_path)
    before = idfleet.ids.store.get_bytes(_key("lost-a"))  # signed, not revoked
    pid, broker = _broker(idfleet)
    revoke_device(idfleet.ids, idfleet.ca, "lost-a", idfleet.ca.paths.crl, pid, broker)
    saved = idfleet.ca.paths.crl.read_bytes()
    attacks = {
        "older record, index deleted": lambda: (
            idfleet.ids.store.put_bytes(_key("lost-a"), before),
            idfleet.ids.store.delete(CRL_INDEX),
        ),
        "index and record both refused": lambda: [
            _edit(idfleet, key, lambda doc: doc.update(schema_version=1))
            for key in (CRL_INDEX, _key("lost-a"))
        ],
    }
    try:
        for name, attack in attacks.items():
            attack()
            idfleet.ca.paths.crl.unlink()  # a new host: no CRL, nor its last good copy
            last_good(idfleet.ca.paths.crl).unlink(missing_ok=True)
            with pytest.raises(ConfigError, match="--first-crl"):
                idfleet.publish_crl()
            assert not idfleet.ca.paths.crl.exists(), name  # nothing written
            idfleet.ca.paths.crl.write_bytes(saved)
            idfleet.publish_crl()  # with its CRL back, the writer keeps the revocation
            assert not _connects(idfleet, files), name
    finally:
        repair(idfleet.ids, idfleet.ca.paths.crl)


def test_repair_does_not_sign_an_unsigned_record_planted_after_the_upgrade(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    _enroll(idfleet, "plant-a", tmp_path)
    pid, broker = _broker(idfleet)
    revoke_device(idfleet.ids, idfleet.ca, "plant-a", idfleet.ca.paths.crl, pid, broker)
    planted = {"schema_version": 1, "device": "plant-a", "current": None, "revoked": False}
    idfleet.ids.store.put_bytes(_key("plant-a"), json.dumps(planted).encode())
    # A record that names its certificate, not revoked, for a device a claim names: it would
    # pass the checks, but the store is past its upgrade (signed records, a signed index).
    _enroll(idfleet, "plant-b", tmp_path)
    doc = json.loads(idfleet.ids.store.get_bytes(_key("plant-b")))
    doc.pop("signature")
    idfleet.ids.store.put_bytes(_key("plant-b"), json.dumps(doc).encode())
    report = repair(idfleet.ids, idfleet.ca.paths.crl)
    assert "plant-a" not in report.signed and "plant-b" not in report.signed
    assert "names no certificate" in report.refused["plant-a"]
    assert "not an upgrade" in report.refused["plant-b"]
    for device in ("plant-a", "plant-b"):
        with pytest.raises(RecordRefused):
            idfleet.ids.device(device)
    # An operator who checked them says so: the record naming its certificate is signed, the
    # one that names none never is.
    report = repair(idfleet.ids, idfleet.ca.paths.crl, sign_unsigned=True)
    assert report.signed == ["plant-b"] and "names no certificate" in report.refused["plant-a"]
