"""Two environments that share one fleet CA (``s3://B/staging`` and ``s3://B/prod``, or another
bucket): a device record or CRL index the CA signed in one is refused in the other as
``misplaced`` and counted, while it still verifies where it was written, and the same bucket
reached through another endpoint host or with other credentials is the same environment. The
stores are buckets on moto's S3 server (real boto3 calls), the enrollment service answers over
Mosquitto with mTLS, the CRL is what the broker reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.fleet_ca import load_cert
from cloud_sync.identity_records import RecordRefused
from cloud_sync.identity_store import CRL_INDEX, IdentityStore
from cloud_sync.revocation import revoke_device
from cloud_sync.store import open_store
from tests.integration.test_identity_store_writer import (  # the same fleet, its own bucket
    _broker,
    _claim,
    _cli,
    _enrolled_with_a_spare,
    _key,
    idfleet,
)
from tests.support.agent import REPO
from tests.support.identity_fleet import IdentityFleet
from tests.support.services import MotoS3

__all__ = ["idfleet"]


def _bucket(s3_server: MotoS3) -> str:
    bucket = f"env-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    return bucket


@pytest.fixture
def staging(idfleet: IdentityFleet, s3_server: MotoS3) -> Iterator[IdentityStore]:
    """Staging beside the fleet's prod (``s3://B/prod``): the same bucket, another prefix."""
    assert idfleet.store_url is not None
    url = idfleet.store_url.removesuffix("/prod") + "/staging"
    yield IdentityStore(open_store(url, endpoint_url=s3_server.endpoint_url), idfleet.ca)


def _copy(s3_server: MotoS3, source: IdentityStore, target: IdentityStore, key: str) -> None:
    """What `aws s3 cp` does: the object, byte for byte, from one environment to the other."""
    src, dst = source.store, target.store
    s3_server.client().copy_object(  # type: ignore[attr-defined]
        CopySource={"Bucket": src.bucket, "Key": f"{src.prefix}/{key}"},  # type: ignore[attr-defined]
        Bucket=dst.bucket,  # type: ignore[attr-defined]
        Key=f"{dst.prefix}/{key}",  # type: ignore[attr-defined]
    )


def _issue(fleet: IdentityFleet, ids: IdentityStore, device: str) -> None:
    cert_file, _ = fleet.ca.issue_identity(device, fleet.root / "env-certs", 1.0)
    ids.record_issue(device, load_cert(cert_file.read_bytes()), via="claim")


def test_a_record_copied_from_staging_does_not_undo_a_revocation_in_prod(
    idfleet: IdentityFleet, staging: IdentityStore, s3_server: MotoS3, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from cloud_sync.identity_metrics import IdentityCollector

    device = "env-a"
    spare = _enrolled_with_a_spare(idfleet, device, tmp_path)  # prod: stolen, then revoked
    pid, broker = _broker(idfleet)
    revoke_device(idfleet.ids, idfleet.ca, device, idfleet.ca.paths.crl, pid, broker)
    prod_serial = idfleet.ids.device(device).current  # type: ignore[union-attr]
    # In staging the same id is a test device, enrolled and not revoked: the real writer.
    _issue(idfleet, staging, device)
    staging.revoke_serial(12345, 2e9)  # and staging's index, signed there
    before = dict(idfleet.ids.refused)
    _copy(s3_server, staging, idfleet.ids, _key(device))
    answer = _claim(idfleet, device, spare)  # record_refused: not enrolled again
    assert "another environment" in answer["error"] and "/staging" in answer["error"]
    with pytest.raises(RecordRefused) as record:
        idfleet.ids.device(device)
    assert record.value.reason == "misplaced"
    _copy(s3_server, staging, idfleet.ids, CRL_INDEX)
    with pytest.raises(RecordRefused) as index:
        idfleet.ids.crl_index()
    assert index.value.reason == "misplaced"
    assert (
        idfleet.ids.refused[("device", "misplaced")] >= before.get(("device", "misplaced"), 0) + 2
    )
    registry = CollectorRegistry()
    registry.register(IdentityCollector(idfleet.service, refresh_s=0))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    line = 'edgebento_identity_records_refused_total{object="crl_index",reason="misplaced"}'
    assert line in text and f"{line} 0.0" not in text, text
    # Where they were written they verify still.
    doc = staging.device(device)
    assert doc is not None and not doc.revoked
    assert [e.serial for e in staging.crl_index().entries] == [format(12345, "x")]
    # identity-repair leaves the copied record for the operator and signs a fresh index for
    # prod: the revocation made there is in it (the CRL lists it).
    done = _cli(
        "fleet", "identity-repair", "--ca", str(idfleet.root / "ca"),
        "--crl-file", str(idfleet.ca.paths.crl), "--store", str(idfleet.store_url),
        "--endpoint-url", s3_server.endpoint_url,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert "misplaced" in report["refused"][device], done.stderr
    listed = {e.serial for e in idfleet.ids.crl_index().entries}  # verifies in prod now
    staging_serial = json.loads(staging.store.get_bytes(_key(device)))["current"]
    assert staging_serial not in listed  # staging's certificate was never prod's to revoke
    idfleet.publish_crl()  # the CRL written from it still lists prod's revocation
    assert int(str(prod_serial), 16) in idfleet.ca.crl_entries(idfleet.ca.paths.crl)
    idfleet.ids.revoke(device)  # the operator's answer: revoked again, signed for prod
    assert idfleet.ids.device(device).revoked  # type: ignore[union-attr]


def test_another_bucket_is_another_environment_another_endpoint_or_credentials_are_not(
    idfleet: IdentityFleet, s3_server: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert idfleet.store_url is not None
    _issue(idfleet, idfleet.ids, "env-b")
    other = IdentityStore(
        open_store(f"s3://{_bucket(s3_server)}/prod", endpoint_url=s3_server.endpoint_url),
        idfleet.ca,
    )
    _copy(s3_server, idfleet.ids, other, _key("env-b"))
    with pytest.raises(RecordRefused) as moved:
        other.device("env-b")
    assert moved.value.reason == "misplaced"
    # The fleet's own bucket through another host name of the same endpoint, with other
    # credentials (moto takes any), and the URL written with a trailing slash.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-operator")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")
    endpoint = s3_server.endpoint_url.replace("127.0.0.1", "localhost")
    same = IdentityStore(open_store(idfleet.store_url + "/", endpoint_url=endpoint), idfleet.ca)
    doc = same.device("env-b")
    assert doc is not None and doc.device == "env-b"
    assert same.crl_index() is not None


def test_fleet_status_shows_refused_records_as_refused_and_survives_hostile_ones(
    idfleet: IdentityFleet, staging: IdentityStore, s3_server: MotoS3
) -> None:
    """``edgebento fleet status --ca`` against the bucket, as an operator runs it."""
    ids = idfleet.ids
    for device in ("st-good", "st-forged"):
        _issue(idfleet, ids, device)
    good = ids.device("st-good")
    assert good is not None
    forged = json.loads(ids.store.get_bytes(_key("st-forged")))
    ids.revoke("st-forged")
    # A bucket writer: the revocation cleared (the stale signature left), a record planted
    # unsigned, one copied from staging, a copy under a nested key, and bytes no reader parses.
    doc = json.loads(ids.store.get_bytes(_key("st-forged")))
    doc.update(revoked=False, revoked_at=None)
    ids.store.put_bytes(_key("st-forged"), json.dumps(doc).encode())
    planted = {"schema_version": 1, "device": "st-planted", "current": "ab", "revoked": False}
    ids.store.put_bytes(_key("st-planted"), json.dumps(planted).encode())
    _issue(idfleet, staging, "st-moved")
    _copy(s3_server, staging, ids, _key("st-moved"))
    ids.store.put_bytes(
        "fleet/identity/devices/zz/st-good.json", ids.store.get_bytes(_key("st-good"))
    )
    ids.store.put_bytes("fleet/identity/devices/\x1b[2J.json", b"{}")  # clears a terminal
    ids.store.put_bytes(_key("st-deep"), b"[" * 100_000 + b"]" * 100_000)
    ids.store.put_bytes(_key("st-bin"), b"\xff\xfe" + os.urandom(64))
    ids.store.put_bytes(_key("st-other"), json.dumps({**planted, "device": "st-good"}).encode())
    # Two devices report: what the forged record's device says of itself is shown as its word.
    said = {"state": "valid", "serial": forged["current"], "not_after": 4e9, "days_left": 1.0}
    for device in ("st-good", "st-forged"):
        client = idfleet.client(device)
        status = {"schema_version": 1, "device": device, "state": "online", "identity": said}
        if device == "st-good":
            own = good.current_record()
            assert own is not None
            status["identity"] = {**said, "serial": own.serial, "not_after": own.not_after}
        client.publish(f"edgebento/{device}/status", status, retain=True)
        client.close()
    try:
        shown = _status(idfleet, s3_server, "--json")
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        rows = {d: v.get("identity") for d, v in doc["devices"].items()}
        assert doc["identity_checked"] is True
        assert rows["st-good"]["state"] == "valid" and rows["st-good"]["mismatch"] == []
        expected = {
            "st-forged": "forged", "st-planted": "unsigned", "st-moved": "misplaced",
            "st-deep": "malformed", "st-bin": "malformed", "st-other": "unsigned",
        }  # fmt: skip
        # A reporting device's refused record is its row; the others are identity_refused,
        # never rows of devices (thousands of objects can be planted under devices/).
        row = rows["st-forged"]
        assert row["state"] == "record refused (forged)", row
        assert (row["serial"], row["revoked"], row["not_after"]) == (None, None, None)
        assert not (set(expected) - {"st-forged"}) & set(rows), sorted(rows)
        assert doc["identity_refused"] == {
            **{d: r for d, r in expected.items() if d != "st-forged"},
            "fleet/identity/devices/zz/st-good.json": "misplaced",
            "fleet/identity/devices/\x1b[2J.json": "misplaced",
        }
        table = _status(idfleet, s3_server)
        assert table.returncode == 0, table.stderr
        line = next(ln for ln in table.stdout.splitlines() if ln.startswith("st-forged"))
        assert "record refused (forged)" in line and "valid" not in line, table.stdout
        assert "identity record refused (misplaced): st-moved" in table.stdout
        assert "fleet/identity/devices/zz/st-good.json" in table.stdout
        assert "devices/\\x1b[2J.json" in table.stdout and "\x1b" not in table.stdout
        # Without the CA no record is read, and the table says so.
        bare = _status(idfleet, s3_server, ca=False)
        assert bare.returncode == 0, bare.stderr
        assert "identity records not read: --ca" in bare.stdout
        assert "record refused" not in bare.stdout
        line = next(ln for ln in bare.stdout.splitlines() if ln.startswith("st-good"))
        assert "(device says)" in line, bare.stdout  # its own word, marked as such
    finally:
        for device in ("st-good", "st-forged"):
            client = idfleet.client(device)
            client.publish(f"edgebento/{device}/status", b"", retain=True)
            client.close()
        for key in (
            "zz/st-good",
            "\x1b[2J",
            "st-deep",
            "st-bin",
            "st-other",
            "st-planted",
            "st-moved",
        ):
            ids.store.delete(f"fleet/identity/devices/{key}.json")


def _status(
    fleet: IdentityFleet, s3_server: MotoS3, *extra: str, ca: bool = True
) -> subprocess.CompletedProcess[str]:
    cert, key = fleet.certs["operator"]
    checked = ("--ca", str(fleet.root / "ca")) if ca else ()
    return subprocess.run(
        [
            sys.executable, "-m", "edgebento", "fleet", "status", "--broker", fleet.broker.url,
            "--store", str(fleet.store_url), "--endpoint-url", s3_server.endpoint_url,
            "--listen", "0.5", *checked, *extra,
        ],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={
            **os.environ, "PYTHONPATH": str(REPO),
            "EDGEBENTO_MQTT_CA_FILE": str(fleet.ca.paths.bundle),
            "EDGEBENTO_MQTT_CERT_FILE": str(cert), "EDGEBENTO_MQTT_KEY_FILE": str(key),
        },
    )  # fmt: skip
