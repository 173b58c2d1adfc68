"""A claim token is bound to the store it was made in, as records are: one copied from staging
into prod (one fleet CA for both) is refused in prod as ``misplaced_claim``, so whoever holds
the staging token cannot enroll that device id in prod; the previous release's claims (signed
without an environment) still enroll until they expire. Buckets on moto's S3 server (real boto3
calls), the real enrollment service over Mosquitto with mTLS."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cloud_sync.identity_claims import CLAIMS, ClaimDoc, token_hash
from cloud_sync.identity_store import IdentityStore
from edge_agent.identity import KeyMaker
from tests.integration.test_identity_environments import _copy, staging
from tests.integration.test_identity_store_writer import _enroll, idfleet
from tests.support.identity_fleet import IdentityFleet, claim_request
from tests.support.services import MotoS3

__all__ = ["idfleet", "staging"]


def _ask(fleet: IdentityFleet, device: str, token: str) -> dict[str, object]:
    from cloud_sync.fleet_ca import new_key

    return fleet.ask_claim(device, claim_request(KeyMaker().csr(new_key(), device), token))


def test_a_claim_copied_from_staging_does_not_enroll_the_device_in_prod(
    idfleet: IdentityFleet, staging: IdentityStore, s3_server: MotoS3, tmp_path: Path
) -> None:
    device = "claim-env-a"
    token = staging.create_claims([device], ttl_s=600)[device]
    key = f"{CLAIMS}/{token_hash(token)}.json"
    _copy(s3_server, staging, idfleet.ids, key)
    before = idfleet.service.refusals["misplaced_claim"]
    answer = _ask(idfleet, device, token)
    assert (answer["ok"], answer["reason"]) == (False, "misplaced_claim"), answer
    assert "/staging" in str(answer["error"]) and "/prod" in str(answer["error"]), answer
    assert idfleet.service.refusals["misplaced_claim"] == before + 1
    assert idfleet.ids.device(device) is None  # nothing recorded, no certificate
    assert json.loads(idfleet.ids.store.get_bytes(key))["used"] == {}
    # Where it was made it verifies: a prod token for the same device enrolls it in prod.
    assert json.loads(staging.store.get_bytes(key))["environment"].endswith("/staging")
    _enroll(idfleet, device, tmp_path)
    assert idfleet.ids.device(device) is not None


def test_a_claim_stripped_of_its_environment_is_forged(
    idfleet: IdentityFleet, staging: IdentityStore, s3_server: MotoS3, tmp_path: Path
) -> None:
    """Dropping the field to pass as a previous release's claim breaks its signature."""
    device = "claim-env-b"
    token = staging.create_claims([device], ttl_s=600)[device]
    key = f"{CLAIMS}/{token_hash(token)}.json"
    doc = json.loads(staging.store.get_bytes(key))
    del doc["environment"]
    idfleet.ids.store.put_bytes(key, json.dumps(doc).encode())
    answer = _ask(idfleet, device, token)
    assert (answer["ok"], answer["reason"]) == (False, "forged_claim"), answer


def test_a_previous_releases_claim_enrolls_until_it_expires(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    """As the previous release wrote it: signed by the CA over no environment."""
    now = time.time()
    tokens = {"claim-env-c": "ebc1.previous-release-c", "claim-env-d": "ebc1.previous-release-d"}
    for device, token in tokens.items():
        expires = now + 600 if device.endswith("c") else now - 1
        doc = ClaimDoc(devices=[device], expires_at=expires, created_at=now - 60)
        doc.signature = idfleet.ca.sign_record(doc.body(token_hash(token)))
        idfleet.ids.store.create(
            f"{CLAIMS}/{token_hash(token)}.json",
            doc.model_dump_json(exclude={"environment"}).encode(),
        )
    answer = _ask(idfleet, "claim-env-c", tokens["claim-env-c"])
    assert answer["ok"] is True, answer
    answer = _ask(idfleet, "claim-env-d", tokens["claim-env-d"])
    assert (answer["ok"], answer["reason"]) == (False, "expired_token"), answer
