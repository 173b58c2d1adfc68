"""Whoever can write the bucket, without the fleet CA's key, cannot steer the fleet's identities:
device records and the CRL's index are signed by the CA and checked when read back. The store
is a bucket on moto's S3 server (real boto3 calls); the real enrollment service answers over
Mosquitto with mTLS and the generated ACL; the CRL writer writes what the broker reads."""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.enroll import enroll_topic
from cloud_sync.fleet_ca import load_cert, new_key, tls_context, write_private
from cloud_sync.identity_records import (
    CertRecord,
    CrlIndex,
    DeviceIdentity,
    RecordRefused,
    retired_entries,
)
from cloud_sync.identity_store import CRL_INDEX, IdentityStore
from cloud_sync.revocation import _connect, _ephemeral, publish_crl, revoke_device
from cloud_sync.store import open_store
from edge_agent.identity import KeyMaker
from tests.support.agent import REPO, wait_for
from tests.support.identity_fleet import PREFIX, IdentityFleet, claim_request
from tests.support.services import MotoS3


@pytest.fixture(scope="module")
def idfleet(tmp_path_factory: pytest.TempPathFactory, s3_server: MotoS3) -> Iterator[IdentityFleet]:
    bucket = f"ids-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    fleet = IdentityFleet(
        tmp_path_factory.mktemp("idwriter"),
        store_url=f"s3://{bucket}/prod",
        endpoint_url=s3_server.endpoint_url,
    ).start()
    yield fleet
    fleet.stop()


def _key(device: str) -> str:
    return f"fleet/identity/devices/{device}.json"


def _enroll(fleet: IdentityFleet, device: str, tmp: Path, token: str | None = None) -> Path:
    """The device enrolled by claim; the directory with its certificate and key."""
    token = token or fleet.ids.create_claims([device], ttl_s=600)[device]
    key = new_key()
    answer = fleet.ask_claim(device, claim_request(KeyMaker().csr(key, device), token))
    assert answer["ok"] is True, answer
    (tmp / device).mkdir()
    (tmp / device / "d.crt").write_text(answer["certificate"])
    write_private(tmp / device / "d.key", key)
    return tmp / device


def _enrolled_with_a_spare(fleet: IdentityFleet, device: str, tmp: Path) -> str:
    """The device enrolled with one claim; a second token the operator made for it (a second
    `fleet claim` run, a lost label), unspent."""
    first, spare = (fleet.ids.create_claims([device], ttl_s=600)[device] for _ in range(2))
    _enroll(fleet, device, tmp, first)
    return spare


def _claim(fleet: IdentityFleet, device: str, token: str) -> dict[str, Any]:
    """A claim for ``device`` with ``token`` and a fresh key: refused as record_refused."""
    answer = fleet.ask_claim(device, claim_request(KeyMaker().csr(new_key(), device), token))
    assert (answer["ok"], answer.get("reason")) == (False, "record_refused"), answer
    return answer


def _connects(fleet: IdentityFleet, files: Path) -> bool:
    ctx = tls_context(fleet.ca.paths.bundle, files / "d.crt", files / "d.key")
    return _connect(ctx, f"probe-{uuid.uuid4().hex[:6]}", "127.0.0.1", fleet.broker.port, 10)


def _broker(fleet: IdentityFleet) -> tuple[int, tuple[str, int]]:
    assert fleet.broker.process is not None
    return fleet.broker.process.pid, ("127.0.0.1", fleet.broker.port)


def _edit(fleet: IdentityFleet, key: str, change: Any) -> None:
    """What a writer to the bucket does: read the JSON, change it, write it back (the stale
    signature field left in place, as an edit in any tool leaves it)."""
    doc = json.loads(fleet.ids.store.get_bytes(key))
    change(doc)
    fleet.ids.store.put_bytes(key, json.dumps(doc).encode())


def _renew(fleet: IdentityFleet, device: str) -> dict[str, Any]:
    return fleet.service.handle(
        device, "renew", claim_request(KeyMaker().csr(new_key(), device), None)
    ).model_dump()


def test_a_serial_dropped_from_the_index_stays_in_the_crl_and_the_device_stays_out(
    idfleet: IdentityFleet, tmp_path: Path, caplog: Any
) -> None:
    files = _enroll(idfleet, "drop-a", tmp_path)
    pid, broker = _broker(idfleet)
    revoke_device(idfleet.ids, idfleet.ca, "drop-a", idfleet.ca.paths.crl, pid, broker)
    assert not _connects(idfleet, files)
    serial = json.loads(idfleet.ids.store.get_bytes(_key("drop-a")))["current"]

    def drop(doc: dict[str, Any]) -> None:
        doc["entries"] = [e for e in doc["entries"] if e["serial"] != serial]

    _edit(idfleet, CRL_INDEX, drop)
    # The CRL is written again by a writer with no CRL of its own yet, told that it is the
    # first on this host (``--first-crl``): the store alone says what it lists.
    idfleet.ca.paths.crl.unlink()
    probe, probe_serial = _ephemeral(idfleet.ca, "revocation-probe")
    refused_before = idfleet.ids.refused[("crl_index", "forged")]
    with caplog.at_level(logging.ERROR, logger="cloud_sync.revocation"):
        publish_crl(
            idfleet.ca,
            idfleet.ids,
            idfleet.ca.paths.crl,
            pid,
            extra={probe_serial: time.time() + 120},
            first=True,
        )
    assert any(CRL_INDEX in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert idfleet.ids.refused[("crl_index", "forged")] == refused_before + 1
    deadline = time.monotonic() + 30
    while _connect(probe, "revocation-probe", *broker, timeout=10):
        assert time.monotonic() < deadline, "the broker did not reload its CRL"
        time.sleep(0.1)
    assert not _connects(idfleet, files)  # the revoked device is still refused
    # Nothing was written over the index it does not trust: the CRL writer goes by the signed
    # records until an operator rebuilds it (``fleet identity-repair``).
    left = json.loads(idfleet.ids.store.get_bytes(CRL_INDEX))["entries"]
    assert serial not in [e["serial"] for e in left]


def test_a_cleared_revocation_lets_the_device_neither_enroll_renew_nor_rotate(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    device = "clear-a"
    spare = _enrolled_with_a_spare(idfleet, device, tmp_path)
    idfleet.ids.revoke(device)
    before = idfleet.service.refusals["record_refused"]
    current = json.loads(idfleet.ids.store.get_bytes(_key(device)))["current"]
    _edit(idfleet, _key(device), lambda d: d.update(revoked=False, revoked_at=None))
    again = _claim(idfleet, device, spare)
    assert "certificate" not in again and "changed after the fleet CA signed it" in again["error"]
    renewed = _renew(idfleet, device)
    assert (renewed["ok"], renewed["reason"], renewed["certificate"]) == (
        False, "record_refused", None,
    )  # fmt: skip
    rotated = idfleet.service.handle(
        device, "rotated", json.dumps({"id": "r1", "serial": current}).encode()
    )
    assert (rotated.ok, rotated.reason) == (False, "record_refused")
    with pytest.raises(RecordRefused):  # nor does the record read as not revoked anywhere
        idfleet.ids.device(device)
    assert idfleet.service.refusals["record_refused"] == before + 3  # counted, by reason


def test_an_older_signed_record_put_back_does_not_undo_a_revocation(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    # A signature binds what a record holds, not when: the record the CA signed before the
    # revocation verifies still. The CRL the broker reads (outside the bucket) says otherwise.
    device = "replay-a"
    spare = _enrolled_with_a_spare(idfleet, device, tmp_path)
    before = idfleet.ids.store.get_bytes(_key(device))
    pid, broker = _broker(idfleet)
    revoke_device(idfleet.ids, idfleet.ca, device, idfleet.ca.paths.crl, pid, broker)
    idfleet.ids.store.put_bytes(_key(device), before)
    again = _claim(idfleet, device, spare)
    assert "the CRL lists it" in again["error"] and "certificate" not in again


def test_a_record_planted_for_a_new_device_does_not_let_its_certificate_renew(
    idfleet: IdentityFleet,
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from cloud_sync.identity_metrics import IdentityCollector

    # A certificate of the fleet CA for "ghost" that enrollment never issued (a cloud
    # identity's name, a device whose record was deleted): without a record it cannot renew.
    planted = {"schema_version": 1, "device": "ghost", "certificates": [], "current": None}
    idfleet.ids.store.put_bytes(_key("ghost"), json.dumps(planted).encode())
    ghost = idfleet.client("ghost")  # mTLS on the device listener with CN=ghost
    try:
        answers = ghost.collect(enroll_topic(PREFIX, "ghost", "response"))
        request = claim_request(KeyMaker().csr(new_key(), "ghost"), None)
        ghost.publish(enroll_topic(PREFIX, "ghost", "renew"), request)
        answer = wait_for(answers, lambda d: d.get("id") == json.loads(request)["id"], 15)
    finally:
        ghost.close()
    assert (answer["ok"], answer.get("reason")) == (False, "record_refused"), answer
    assert "not signed by the fleet CA" in answer["error"] and "certificate" not in answer
    registry = CollectorRegistry()
    registry.register(IdentityCollector(idfleet.service, refresh_s=0))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    line = 'edgebento_identity_records_refused_total{object="device",reason="unsigned"}'
    assert line in text, text


def test_records_swapped_between_devices_are_refused(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    spare = idfleet.ids.create_claims(["swap-a"], ttl_s=600)["swap-a"]
    _enroll(idfleet, "swap-a", tmp_path)
    _enroll(idfleet, "swap-b", tmp_path)
    idfleet.ids.revoke("swap-a")
    store = idfleet.ids.store
    revoked, healthy = store.get_bytes(_key("swap-a")), store.get_bytes(_key("swap-b"))
    # Each device's signed record, byte for byte, on the other's object.
    store.put_bytes(_key("swap-a"), healthy)
    store.put_bytes(_key("swap-b"), revoked)
    for device in ("swap-a", "swap-b"):
        answer = _renew(idfleet, device)
        assert (answer["ok"], answer["reason"]) == (False, "record_refused"), answer
    # The healthy record's bytes with the device's name put right: changed, so refused too.
    store.put_bytes(_key("swap-a"), healthy.replace(b'"swap-b"', b'"swap-a"'))
    assert "certificate" not in _claim(idfleet, "swap-a", spare)


def test_an_older_releases_records_are_refused_until_identity_repair_signs_them(
    idfleet: IdentityFleet, tmp_path: Path, s3_server: MotoS3
) -> None:
    """The upgrade: a store written by the release before records were signed (a fresh bucket,
    the same CA), then ``edgebento fleet identity-repair`` run by the operator."""
    bucket = f"old-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    url = f"s3://{bucket}/prod"
    old = IdentityStore(open_store(url, endpoint_url=s3_server.endpoint_url), idfleet.ca)
    old.create_claims(["old-a", "old-b", "old-c"], ttl_s=600)  # claims were signed already
    # What the release before wrote: each device's record, and the index, unsigned.
    records = {d: _old_record(idfleet, d) for d in ("old-a", "old-b", "old-c", "ghost")}
    records["old-b"].revoked, records["old-b"].revoked_at = True, time.time()
    for device, doc in records.items():
        old.store.put_bytes(_key(device), doc.model_dump_json().encode())
    serial_b, serial_c = (str(records[d].current) for d in ("old-b", "old-c"))
    index = CrlIndex(entries=retired_entries(records["old-b"]))
    old.store.put_bytes(CRL_INDEX, index.model_dump_json().encode())
    # The broker's CRL lists old-b's certificate, and old-c's: a bucket writer had cleared
    # old-c's revocation in its record before the upgrade.
    crl = tmp_path / "crl.pem"
    now = dt.datetime.now(dt.UTC)
    crl.write_bytes(idfleet.ca.crl([(int(serial_b, 16), now), (int(serial_c, 16), now)]))

    with pytest.raises(RecordRefused) as refused:
        old.device("old-a")
    assert refused.value.reason == "unsigned"
    assert "edgebento fleet identity-repair" in str(refused.value)
    with pytest.raises(RecordRefused):
        old.revoked_serials()

    done = _cli(
        "fleet", "identity-repair", "--ca", str(idfleet.root / "ca"), "--crl-file", str(crl),
        "--store", url, "--endpoint-url", s3_server.endpoint_url,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # 1: some records were left unsigned
    report = json.loads(done.stdout)
    assert sorted(report["signed"]) == ["old-a", "old-b"]
    assert set(report["refused"]) == {"old-c", "ghost"}
    assert "no claim signed by the fleet CA" in report["refused"]["ghost"]
    assert "CRL lists its current certificate" in report["refused"]["old-c"]
    checked = IdentityStore(open_store(url, endpoint_url=s3_server.endpoint_url), idfleet.ca)
    assert checked.device("old-a") is not None
    doc_b = checked.device("old-b")
    assert doc_b is not None and doc_b.revoked
    serials = {s for s, _ in checked.revoked_serials()}  # the index verifies now
    assert {int(serial_b, 16), int(serial_c, 16)} <= serials
    with pytest.raises(RecordRefused):
        checked.device("old-c")
    # What the operator sees of them: checked with --ca, each refused record named as such.
    shown = _cli(
        "fleet", "identity", "--ca", str(idfleet.root / "ca"), "--store", url,
        "--endpoint-url", s3_server.endpoint_url, "--json",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert rows["checked"] is True and rows["devices"]["old-a"]["state"] == "valid"
    assert rows["devices"]["old-b"]["state"] == "revoked"
    assert rows["devices"]["ghost"]["state"] == "record refused (unsigned)"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgebento", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


def _old_record(fleet: IdentityFleet, device: str) -> DeviceIdentity:
    """A device's record as the release before wrote it, for a certificate of the fleet CA."""
    cert_file, _ = fleet.ca.issue_identity(device, fleet.root / "old-certs", 1.0)
    cert = load_cert(cert_file.read_bytes())
    serial = format(cert.serial_number, "x")
    issued = CertRecord(
        serial=serial,
        issued_at=time.time(),
        not_after=cert.not_valid_after_utc.timestamp(),
        via="claim",
    )
    return DeviceIdentity(device=device, certificates=[issued], current=serial)
