"""A claim never undoes a revocation or enrolls twice, whatever the bucket or the clocks say; a
planted record is never signed over the CRL's ledger; `fleet status --ca` stays readable over
thousands of planted objects. Moto's S3 server, Mosquitto with mTLS, the real enrollment
service, ``fleet revoke``'s revocation and the CLI, each test failing on the previous code:

- a claim spent while ``fleet revoke`` runs (its revocation landing between the claim's check
  and its record write) brought the device back (record not revoked, a new certificate out);
- a spare claim made on a host whose clock ran 5 minutes fast, a minute before the revocation,
  read as made after it and enrolled the revoked device again;
- a bucket writer cleared ``used`` (outside the signature) and the token enrolled again;
- identity-repair --sign-unsigned signed a planted record saying "not revoked" for a device
  the CRL's ledger names as revoked;
- 600 planted ``{}`` objects under devices/ became 600 devices in --json and 600 lines."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.crl_disk import read_disk_crl
from cloud_sync.enroll import EnrollmentService, RateLimit
from cloud_sync.fleet_ca import FleetCA, new_key
from cloud_sync.identity_store import IdentityStore
from cloud_sync.revocation import revoke_device
from cloud_sync.store import open_store
from edge_agent.identity import KeyMaker
from tests.integration.test_identity_store_writer import (
    _broker,
    _cli,
    _connects,
    _edit,
    _enroll,
    _key,
    _old_record,
    idfleet,
)
from tests.support.identity_cli import as_operator, fleet_cli
from tests.support.identity_fleet import IdentityFleet, claim_request
from tests.support.services import MotoS3

__all__ = ["idfleet"]


def _csr(device: str, token: str) -> bytes:
    return claim_request(KeyMaker().csr(new_key(), device), token)


def _revoke(fleet: IdentityFleet, device: str) -> None:
    """``fleet revoke DEVICE`` as it runs on the broker's host: the CRL taken, session dropped."""
    ids = IdentityStore(fleet.ids.store, fleet.ca, fleet.ca.paths.crl)
    pid, broker = _broker(fleet)
    revoke_device(ids, fleet.ca, device, fleet.ca.paths.crl, pid, broker)


class RevokeWhileSigning(FleetCA):
    """The fleet CA, which runs ``then`` once it has signed a certificate: a ``fleet revoke``
    landing while a claim is being answered, after its checks and before its record write."""

    then: Any = None

    def sign_device_csr(self, csr: bytes, device: str, days: float = 90) -> Any:
        cert = super().sign_device_csr(csr, device, days)
        then, RevokeWhileSigning.then = RevokeWhileSigning.then, None
        if then is not None:
            then()
        return cert


def test_a_claim_spent_while_the_device_is_revoked_does_not_bring_it_back(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    device = f"race-{uuid.uuid4().hex[:6]}"
    first, spare = (idfleet.ids.create_claims([device], ttl_s=600)[device] for _ in range(2))
    enrolled = _enroll(idfleet, device, tmp_path, first)
    ca = RevokeWhileSigning.load(idfleet.root / "ca")
    service = EnrollmentService(ca, idfleet.ids, limit=RateLimit(1e3, 1000, 0))
    RevokeWhileSigning.then = lambda: _revoke(idfleet, device)
    answer = service.handle(device, "claim", _csr(device, spare))
    assert (answer.ok, answer.reason, answer.certificate) == (False, "revoked", None), answer
    record = idfleet.ids.device(device)
    assert record is not None and record.revoked
    assert device in read_disk_crl(idfleet.ca, idfleet.ca.paths.crl).devices
    assert not _connects(idfleet, enrolled)


def test_a_claim_from_a_fast_clock_made_before_the_revocation_never_re_enrolls(
    idfleet: IdentityFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = f"skew-{uuid.uuid4().hex[:6]}"
    first = idfleet.ids.create_claims([device], ttl_s=3600)[device]
    real = time.time
    with monkeypatch.context() as laptop:  # `fleet claim` on a laptop 5 minutes fast
        laptop.setattr(time, "time", lambda: real() + 300)
        spare = idfleet.ids.create_claims([device], ttl_s=3600)[device]
    _enroll(idfleet, device, tmp_path, first)
    _revoke(idfleet, device)  # a minute later, on the broker's host
    idfleet.ids.store.delete(_key(device))  # and its record gone (or never read again)
    again = idfleet.ask_claim(device, _csr(device, spare))
    assert (again["ok"], again["reason"]) == (False, "revoked"), again
    assert "certificate" not in again or again["certificate"] is None
    # A claim the operator makes after the revocation enrolls it again, as meant.
    token = idfleet.ids.create_claims([device], ttl_s=600)[device]
    assert idfleet.ask_claim(device, _csr(device, token))["ok"] is True


def test_a_spent_claim_whose_used_a_bucket_writer_cleared_does_not_enroll_again(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    device = f"reuse-{uuid.uuid4().hex[:6]}"
    token = idfleet.ids.create_claims([device], ttl_s=600)[device]
    _enroll(idfleet, device, tmp_path, token)
    (claim_key,) = [  # keys are hashes: the claim found by what it names
        k
        for k in idfleet.ids.store.list("fleet/identity/claims/")
        if json.loads(idfleet.ids.store.get_bytes(k))["devices"] == [device]
    ]
    _edit(idfleet, claim_key, lambda doc: doc.update(used={}))  # signature untouched: verifies
    again = idfleet.ask_claim(device, _csr(device, token))
    assert (again["ok"], again["reason"]) == (False, "token_reused"), again
    # So does a service started afresh on the same host (the list is on disk, not in memory).
    fresh = IdentityStore(idfleet.ids.store, idfleet.ca, idfleet.ca.paths.crl)
    answer = EnrollmentService(idfleet.ca, fresh).handle(device, "claim", _csr(device, token))
    assert (answer.ok, answer.reason) == (False, "token_reused"), answer


def test_identity_repair_never_signs_a_planted_record_over_the_ledgers_revocation(
    idfleet: IdentityFleet, s3_server: MotoS3, tmp_path: Path
) -> None:
    device = f"plant-{uuid.uuid4().hex[:6]}"
    _enroll(idfleet, device, tmp_path)  # a claim the CA signed names it
    _revoke(idfleet, device)
    # A bucket writer plants an unsigned record: not revoked, a certificate of the CA that the
    # CRL does not list (issued after the revocation, as far as the record says).
    planted = _old_record(idfleet, device)
    idfleet.ids.store.put_bytes(_key(device), planted.model_dump_json().encode())
    done = _cli(
        "fleet", "identity-repair", "--sign-unsigned", "--ca", str(idfleet.root / "ca"),
        "--crl-file", str(idfleet.ca.paths.crl), "--store", str(idfleet.store_url),
        "--endpoint-url", s3_server.endpoint_url,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert device not in report["signed"], report
    assert "ledger says revoked" in report["refused"][device], report
    again = idfleet.service.handle(device, "renew", _csr(device, "x"))
    assert (again.ok, again.reason) == (False, "record_refused"), again


def test_fleet_status_ca_lists_planted_objects_as_refused_not_as_devices(
    idfleet: IdentityFleet, s3_server: MotoS3, tmp_path: Path
) -> None:
    real = f"seen-{uuid.uuid4().hex[:6]}"
    _enroll(idfleet, real, tmp_path)
    planted = [f"fake-{i:04d}" for i in range(600)]
    store = open_store(str(idfleet.store_url), endpoint_url=s3_server.endpoint_url)
    for name in planted:
        store.put_bytes(_key(name), b"{}")
    args = (
        "fleet", "status", "--broker", idfleet.broker.url, "--store", str(idfleet.store_url),
        "--ca", str(idfleet.root / "ca"), "--endpoint-url", s3_server.endpoint_url,
        "--listen", "0.5",
    )  # fmt: skip
    doc = json.loads(fleet_cli(*args, "--json", env=as_operator(idfleet)))
    assert not set(planted) & set(doc["devices"]), sorted(doc["devices"])[:5]
    assert set(planted) <= set(doc["identity_refused"])
    assert doc["devices"][real]["identity"]["state"] == "valid"
    table = fleet_cli(*args, env=as_operator(idfleet))
    refused = [ln for ln in table.splitlines() if ln.startswith("identity record refused")]
    assert 0 < len(refused) <= 20, table[-2000:]
    assert any(ln.startswith("... and ") and "more refused" in ln for ln in table.splitlines())
    for name in planted:
        store.delete(_key(name))


def test_the_certificate_cell_prints_what_a_device_sent_as_one_printable_line() -> None:
    from edgebento.cli.fleet import _certificate

    hostile = {"serial": "\x1b[2J\x1b]0;owned\x07", "not_after": time.time() + 3600}
    row = {"refused": "unsigned", "state": "record refused (unsigned)"}
    for cell in (_certificate(row, hostile), _certificate(None, hostile)):
        text = str(getattr(cell, "text", cell))
        assert text.isprintable() and "\x1b" not in text, repr(text)
