"""Faults around the broker host's list of spent claims (cloud_sync/spent_claims.py) and
``fleet revoke``'s voiding of a device's claims: moto's S3 server, the real enrollment service
and ``revoke_device`` (what ``fleet revoke`` runs), each test failing on the previous code:

- one object planted under fleet/identity/claims/ whose key the store refuses (``x\\y.json``)
  made every ``fleet revoke`` raise before the revoked record and the CRL were written;
- a claim object over what a real claim can be was read (up to 4 MiB) and dropped uncounted;
- the list failing to be written (a full disk) after the bucket said ``used``: the device got an
  error and its retry token_reused, locked out;
- the list deleted (a host moved with the CRL and its last good copy only) read as empty:
  a spent claim whose ``used`` a bucket writer cleared enrolled again."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from cloud_sync.crl_disk import read_disk_crl
from cloud_sync.enroll import EnrollmentService, RateLimit
from cloud_sync.fleet_ca import FleetCA, init_ca, new_key
from cloud_sync.identity_claims import CLAIMS, ClaimDoc, token_hash
from cloud_sync.identity_records import CLAIM_MAX_BYTES, MAX_CLAIM_DEVICES
from cloud_sync.identity_store import IdentityStore
from cloud_sync.revocation import publish_crl, revoke_device
from cloud_sync.spent_claims import SpentClaims, spent_path
from cloud_sync.store import open_store
from edge_agent.identity import KeyMaker
from tests.support.identity_fleet import claim_request
from tests.support.services import MotoS3


class Host:
    """The broker's host: the CA, its CRL (written first, as ``--first-crl``) and the store."""

    def __init__(self, tmp: Path, s3: MotoS3) -> None:
        init_ca(tmp / "ca")
        self.ca, self.crl = FleetCA.load(tmp / "ca"), tmp / "broker" / "crl.pem"
        bucket = f"faults-{uuid.uuid4().hex[:10]}"
        s3.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        self.s3, self.bucket = s3, bucket
        store = open_store(f"s3://{bucket}/prod", endpoint_url=s3.endpoint_url)
        self.ids = IdentityStore(store, self.ca, self.crl)
        publish_crl(self.ca, self.ids, self.crl, None, first=True)
        self.service = EnrollmentService(self.ca, self.ids, limit=RateLimit(1e3, 1000, 0))

    def plant(self, key: str, body: bytes) -> None:
        self.s3.client().put_object(Bucket=self.bucket, Key=f"prod/{key}", Body=body)  # type: ignore[attr-defined]

    def claim(self, device: str, token: str) -> tuple[bool, str | None]:
        csr = claim_request(KeyMaker().csr(new_key(), device), token)
        answer = self.service.handle(device, "claim", csr)
        return answer.ok, answer.reason

    def clear_used(self, token: str) -> None:
        """A bucket writer: ``used`` is outside the claim's signature."""
        key = f"{CLAIMS}/{token_hash(token)}.json"
        data, etag = self.ids.store.read(key)
        self.ids.store.replace(key, json.dumps(json.loads(data) | {"used": {}}).encode(), etag)


@pytest.fixture
def host(tmp_path: Path, s3_server: MotoS3) -> Host:
    return Host(tmp_path, s3_server)


@pytest.mark.parametrize("planted", ["x\\y.json", "a//b.json", "./x"])
def test_a_planted_claim_key_does_not_stop_fleet_revoke(host: Host, planted: str) -> None:
    token = host.ids.create_claims(["cam-1"], ttl_s=600)["cam-1"]
    host.plant(f"{CLAIMS}/{planted}", b"{}")
    revoke_device(host.ids, host.ca, "cam-1", host.crl, None, None)
    record = host.ids.device("cam-1")
    assert record is not None and record.revoked
    assert "cam-1" in read_disk_crl(host.ca, host.crl).devices  # the CRL's ledger names it
    assert host.ids.refused[("claim", "unreadable")] == 1
    with SpentClaims(spent_path(host.crl)).held() as held:  # its claim voided all the same
        assert held.why_not(token_hash(token), "cam-1") == "revoked"
    assert host.claim("cam-1", token) == (False, "revoked")


def test_a_claim_object_over_what_a_real_claim_can_be_is_refused_and_counted(host: Host) -> None:
    # The biggest real claim: every device of a full batch with a 64-byte id, all spent.
    ids = [f"{i:064d}" for i in range(MAX_CLAIM_DEVICES)]
    full = ClaimDoc(devices=ids, batch=True, expires_at=time.time(), created_at=time.time())
    full.used = dict.fromkeys(ids, time.time())
    full.environment, full.signature = "s3://" + "b" * 63 + "/" + "p" * 200, "s" * 200
    assert len(full.model_dump_json()) < CLAIM_MAX_BYTES
    host.plant(f"{CLAIMS}/{'0' * 64}.json", b" " * (CLAIM_MAX_BYTES + 1))
    revoke_device(host.ids, host.ca, "cam-2", host.crl, None, None)
    assert host.ids.refused[("claim", "malformed")] == 1


def test_a_spent_list_that_cannot_be_written_refuses_with_nothing_spent(host: Host) -> None:
    token = host.ids.create_claims(["cam-3"], ttl_s=600)["cam-3"]
    path = spent_path(host.crl)  # write_public's own temporary file, taken by a directory
    blocker = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    blocker.mkdir()
    assert host.claim("cam-3", token) == (False, "record_refused")
    blocker.rmdir()  # space freed: the device's retry enrolls, the claim is spent once
    assert host.claim("cam-3", token) == (True, None)
    host.clear_used(token)
    assert host.claim("cam-3", token) == (False, "token_reused")


def test_a_spent_list_missing_beside_the_crl_refuses_claims(host: Host) -> None:
    token = host.ids.create_claims(["cam-4"], ttl_s=600)["cam-4"]
    assert host.claim("cam-4", token) == (True, None)
    spent_path(host.crl).unlink()  # a host moved with crl.pem and crl.pem.last-good only
    host.clear_used(token)
    assert host.claim("cam-4", token) == (False, "record_refused")
    other = host.ids.create_claims(["cam-5"], ttl_s=600)["cam-5"]
    assert host.claim("cam-5", other) == (False, "record_refused")  # nothing spent on trust
    spent_path(host.crl).write_bytes(b'{"v":1}')  # the operator's fix the error names
    assert host.claim("cam-5", other) == (True, None)
