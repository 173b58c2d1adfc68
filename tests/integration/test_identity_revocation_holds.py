"""A revocation holds whatever the bucket holds or lost, after review 3 of device identity: a
certificate stays in the CRL until it expires, a spare claim from before a revocation never
re-enrolls the device (its record put back or deleted), a crash between a rotation's two writes
loses no retired certificate, and identity-repair keeps what only the index and the CRL held.
The store is a bucket on moto's S3 server, the enrollment service is the real one, the CRL is
what Mosquitto (mTLS) reads."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.crl_disk import read_disk_crl
from cloud_sync.enroll import EnrollmentService, RateLimit
from cloud_sync.fleet_ca import FleetCA, load_cert, new_key
from cloud_sync.identity_repair import repair
from cloud_sync.identity_store import CRL_INDEX, IdentityStore
from cloud_sync.revocation import (
    _connect,
    _reloaded,
    publish_crl,
    revoke_certificate,
    revoke_device,
)
from edge_agent.identity import KeyMaker
from modelpack.errors import StoreError
from tests.integration.test_identity_store_writer import (  # the same fleet, its own bucket
    _broker,
    _cli,
    _connects,
    _enroll,
    _key,
    _renew,
    idfleet,
)
from tests.support.identity_fleet import IdentityFleet, claim_request
from tests.support.services import MotoS3

__all__ = ["idfleet"]


def _aged(ca: FleetCA, crl: Path, days: float) -> None:
    """The CRL as it stands ``days`` on, as far as its entries' ages go: each revocation date
    moved back, every extension kept (its number, its ledger), signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    old, now = x509.load_pem_x509_crl(crl.read_bytes()), dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(old.issuer)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=30))
    )
    for ext in old.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    for entry in old:
        when = entry.revocation_date_utc - dt.timedelta(days=days)
        revoked = x509.RevokedCertificateBuilder().serial_number(entry.serial_number)
        builder = builder.add_revoked_certificate(revoked.revocation_date(when).build())
    signed = builder.sign(ca.key, hashes.SHA256())
    crl.write_bytes(signed.public_bytes(serialization.Encoding.PEM))


def _listed(fleet: IdentityFleet) -> set[int]:
    return set(fleet.ca.crl_entries(fleet.ca.paths.crl))


def _csr(device: str, token: str | None) -> bytes:
    return claim_request(KeyMaker().csr(new_key(), device), token)


@pytest.fixture
def fresh(tmp_path: Path, s3_server: MotoS3) -> Iterator[IdentityFleet]:
    """A fleet of its own: its broker's CRL is still the CA's first (number 0)."""
    bucket = f"fresh-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    fleet = IdentityFleet(
        tmp_path / "fleet", store_url=f"s3://{bucket}/prod", endpoint_url=s3_server.endpoint_url
    ).start()
    yield fleet
    fleet.stop()


def test_a_revoked_certificate_stays_in_the_crl_until_it_expires_whatever_the_bucket_holds(
    fresh: IdentityFleet,
) -> None:
    # The fleet's first CRL change: its claim certificate (365 days) leaked and is revoked.
    claim_pem = fresh.certs["claim"][0].read_bytes()
    serial = load_cert(claim_pem).serial_number
    pid, broker = _broker(fresh)
    revoke_certificate(fresh.ids, fresh.ca, claim_pem, fresh.ca.paths.crl, pid, broker)
    assert read_disk_crl(fresh.ca, fresh.ca.paths.crl).number == 1
    claim = fresh.context("claim")
    assert not _connect(claim, "claim-x", "127.0.0.1", fresh.broker.claim_port, 10)
    # 100 days on (past the 90 the CRL used to keep an entry for its age), a bucket writer
    # deletes the index: it is built again from the records, at generation 1, without it.
    _aged(fresh.ca, fresh.ca.paths.crl, 100)
    fresh.ids.store.delete(CRL_INDEX)
    _reloaded(fresh.ids, fresh.ca, fresh.ca.paths.crl, pid, broker, 10)  # the next CRL, taken
    assert serial in _listed(fresh)
    assert not _connect(claim, "claim-x", "127.0.0.1", fresh.broker.claim_port, 10)


def test_a_spare_claim_never_re_enrolls_a_revoked_device_whose_record_went_back_or_away(
    idfleet: IdentityFleet,
) -> None:
    device = "spare-a"
    first, spare = (idfleet.ids.create_claims([device], ttl_s=600)[device] for _ in range(2))
    # Enrolled with a certificate of a few seconds, so that it expires and leaves the CRL.
    brief = EnrollmentService(
        idfleet.ca, idfleet.ids, days=3 / 86400, limit=RateLimit(1e3, 1000, 0)
    )
    answer = brief.handle(device, "claim", _csr(device, first))
    assert answer.ok and answer.certificate is not None, answer
    cert = load_cert(answer.certificate.encode())
    before = idfleet.ids.store.get_bytes(_key(device))  # signed, not revoked
    pid, broker = _broker(idfleet)
    revoke_device(idfleet.ids, idfleet.ca, device, idfleet.ca.paths.crl, pid, broker)
    while time.time() <= cert.not_valid_after_utc.timestamp():  # until it has expired
        time.sleep(0.05)
    _aged(idfleet.ca, idfleet.ca.paths.crl, 100)  # and the revocation is old
    idfleet.publish_crl()
    assert cert.serial_number not in _listed(idfleet)  # expired: refused by its date alone
    idfleet.ids.store.put_bytes(_key(device), before)  # the older signed record put back
    again = idfleet.ask_claim(device, _csr(device, spare))
    assert (again["ok"], again.get("reason")) == (False, "record_refused"), again
    assert "revoked at" in again["error"] and "certificate" not in again
    idfleet.ids.store.delete(_key(device))  # deleted: it looks never enrolled
    again = idfleet.ask_claim(device, _csr(device, spare))
    assert (again["ok"], again.get("reason")) == (False, "revoked"), again
    # A claim made after the revocation enrolls it again, as the operator means it to.
    token = idfleet.ids.create_claims([device], ttl_s=600)[device]
    assert idfleet.ask_claim(device, _csr(device, token))["ok"] is True


class IndexWriteFails:
    """The real store, whose next write of the CRL's index fails (the process killed there, or
    S3 answering 500) after the device record's write went through."""

    def __init__(self, store: Any) -> None:
        self.store, self.armed = store, True

    def _check(self, key: str) -> None:
        if self.armed and key == CRL_INDEX:
            self.armed = False
            raise StoreError(f"{key}: injected failure after the record's write")

    def create(self, key: str, data: bytes) -> str:
        self._check(key)
        return str(self.store.create(key, data))

    def replace(self, key: str, data: bytes, etag: str) -> str:
        self._check(key)
        return str(self.store.replace(key, data, etag))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def _rotation_cut_short(fleet: IdentityFleet, device: str) -> str:
    """A renewal of ``device``, then its ``rotated`` (what retires the old certificate) whose
    index write fails; the serial it retired."""
    old = json.loads(fleet.ids.store.get_bytes(_key(device)))["current"]
    assert _renew(fleet, device)["ok"] is True
    new = json.loads(fleet.ids.store.get_bytes(_key(device)))["pending"][-1]
    cut = IdentityStore(IndexWriteFails(fleet.ids.store), fleet.ca, fleet.ca.paths.crl)  # type: ignore[arg-type]
    service = EnrollmentService(fleet.ca, cut, limit=RateLimit(1e3, 1000, 0))
    with pytest.raises(StoreError, match="injected"):
        service.handle(device, "rotated", json.dumps({"id": "r", "serial": new}).encode())
    record = fleet.ids.device(device)
    assert record is not None and old in record.retired  # the record's write went through
    return str(old)


def test_a_rotation_cut_short_between_its_two_writes_loses_no_retired_certificate(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    pid, broker = _broker(idfleet)
    # The device renews again (the next one a rotation): it lists what the first retired.
    files = _enroll(idfleet, "cut-a", tmp_path)
    old = _rotation_cut_short(idfleet, "cut-a")
    assert _renew(idfleet, "cut-a")["ok"] is True
    _reloaded(idfleet.ids, idfleet.ca, idfleet.ca.paths.crl, pid, broker, 10)  # its rotation
    assert int(old, 16) in _listed(idfleet) and not _connects(idfleet, files)
    # It never asks again (gone for good): the service's CRL refresh reads every record.
    files = _enroll(idfleet, "cut-b", tmp_path)
    old = _rotation_cut_short(idfleet, "cut-b")
    publish_crl(idfleet.ca, idfleet.ids, idfleet.ca.paths.crl, pid, records=True)
    assert int(old, 16) in _listed(idfleet)
    assert int(old, 16) in {s for s, _ in idfleet.ids.revoked_serials()}  # in the index too


def test_identity_repair_keeps_a_revocation_that_only_the_index_and_the_crl_held(
    idfleet: IdentityFleet,
) -> None:
    cert_file, _ = idfleet.ca.issue_identity("claim", idfleet.root / "leaked")  # 365 days
    serial = load_cert(cert_file.read_bytes()).serial_number
    older = idfleet.ids.store.get_bytes(CRL_INDEX)  # signed, from before its revocation
    pid, broker = _broker(idfleet)
    revoke_certificate(
        idfleet.ids, idfleet.ca, cert_file.read_bytes(), idfleet.ca.paths.crl, pid, broker
    )

    def edit() -> None:  # the claim certificate's entry taken out, the signature left
        doc = json.loads(idfleet.ids.store.get_bytes(CRL_INDEX))
        doc["entries"] = [e for e in doc["entries"] if int(e["serial"], 16) != serial]
        idfleet.ids.store.put_bytes(CRL_INDEX, json.dumps(doc).encode())

    def by_cli() -> None:  # `edgebento fleet identity-repair`, as the operator runs it
        url, endpoint = idfleet.store_url, idfleet.endpoint_url
        assert url is not None and endpoint is not None
        done = _cli(
            "fleet", "identity-repair", "--ca", str(idfleet.root / "ca"),
            "--crl-file", str(idfleet.ca.paths.crl), "--store", url, "--endpoint-url", endpoint,
        )  # fmt: skip
        assert json.loads(done.stdout)["index_entries"] > 0, done.stderr

    attacks = {
        "an older signed index put back": lambda: idfleet.ids.store.put_bytes(CRL_INDEX, older),
        "the index deleted": lambda: idfleet.ids.store.delete(CRL_INDEX),
        "its entry edited out": edit,
    }
    for name, attack in attacks.items():
        attack()
        if name == "the index deleted":
            by_cli()
        else:
            repair(idfleet.ids, idfleet.ca.paths.crl)
        assert serial in {s for s, _ in idfleet.ids.revoked_serials()}, name
        _aged(idfleet.ca, idfleet.ca.paths.crl, 100)
        idfleet.publish_crl()  # the index the repair wrote is taken: nothing leaves the CRL
        assert serial in _listed(idfleet), name
