"""The enrollment host's list of spent claims, damaged, is rebuilt from the bucket and the CRL by
``edgebento fleet rebuild-spent-claims``; meanwhile every claim is refused with a message that
names the command, and ``edgebento_identity_spent_claims_unreadable`` reads 1. Moto's S3
server, Mosquitto with mTLS, the real enrollment service, ``fleet revoke``'s revocation and the
CLI in its own process. Previous code: no such command, the refusal said "fix or remove it"
(removing it beside the CRL's last good copy kept every claim refused), no gauge."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.identity_claims import CLAIMS, token_hash
from cloud_sync.identity_metrics import IdentityCollector
from cloud_sync.spent_claims import spent_path
from tests.integration.test_identity_claim_spent import _csr, _revoke
from tests.integration.test_identity_store_writer import _edit, _enroll, idfleet
from tests.support.identity_cli import fleet_cli
from tests.support.identity_fleet import IdentityFleet

__all__ = ["idfleet"]


def _unreadable(fleet: IdentityFleet) -> float:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    collector = IdentityCollector(fleet.service, crl_file=fleet.ca.paths.crl)
    registry.register(collector)  # type: ignore[arg-type]
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("edgebento_identity_spent_claims_unreadable "):
            return float(line.split()[1])
    raise AssertionError("no spent-claims gauge")


def _rebuild(fleet: IdentityFleet) -> dict[str, Any]:
    """``edgebento fleet rebuild-spent-claims``, as the operator runs it on the broker's host."""
    out = fleet_cli(
        "fleet", "rebuild-spent-claims", "--ca", fleet.root / "ca",
        "--crl-file", fleet.ca.paths.crl, "--store", fleet.ids.store.url,
        "--endpoint-url", str(fleet.endpoint_url),
    )  # fmt: skip
    return dict(json.loads(out))


def _claim(fleet: IdentityFleet, device: str, token: str) -> dict[str, Any]:
    return fleet.ask_claim(device, _csr(device, token))


def test_a_damaged_spent_list_is_rebuilt_from_the_bucket_and_still_refuses_spent_claims(
    idfleet: IdentityFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = uuid.uuid4().hex[:6]
    enrolled, revoked, fresh = f"sa-{tag}", f"sr-{tag}", f"sn-{tag}"
    first, spare = (idfleet.ids.create_claims([enrolled], ttl_s=3600)[enrolled] for _ in "ab")
    _enroll(idfleet, enrolled, tmp_path, first)
    used_then_revoked = idfleet.ids.create_claims([revoked], ttl_s=3600)[revoked]
    _enroll(idfleet, revoked, tmp_path, used_then_revoked)
    real = time.time
    with monkeypatch.context() as laptop:  # `fleet claim` on a laptop 5 minutes fast
        laptop.setattr(time, "time", lambda: real() + 300)
        fast = idfleet.ids.create_claims([revoked], ttl_s=3600)[revoked]
    _revoke(idfleet, revoked)
    unused = idfleet.ids.create_claims([fresh], ttl_s=3600)[fresh]
    listed = spent_path(idfleet.ca.paths.crl)
    before = json.loads(listed.read_text())["claims"]
    assert _unreadable(idfleet) == 0.0

    listed.write_bytes(b'{"v":1,"claims":{"')  # a crash mid-write by a tool, a full disk
    refused = _claim(idfleet, fresh, unused)
    assert (refused["ok"], refused["reason"]) == (False, "record_refused"), refused
    assert "edgebento fleet rebuild-spent-claims" in refused["error"], refused["error"]
    assert _unreadable(idfleet) == 1.0

    report = _rebuild(idfleet)
    assert report["damaged"] and Path(report["damaged"]).read_bytes().startswith(b'{"v":1')
    assert _unreadable(idfleet) == 0.0
    rebuilt = json.loads(listed.read_text())["claims"]
    # Everything the lost list held is back, as strict or stricter.
    for key, entry in before.items():
        assert key in rebuilt, key
        assert entry["why"] == "spent" or rebuilt[key]["why"] == "revoked", (key, entry)
    whys = {
        (token_hash(first), enrolled): "spent",
        (token_hash(spare), enrolled): "spent",  # an enrolled device needs no claim
        (token_hash(used_then_revoked), revoked): "revoked",
        (token_hash(fast), revoked): "revoked",  # made before the revocation, clock fast
    }
    for (key_hash, device), why in whys.items():
        assert rebuilt[f"{key_hash}:{device}"]["why"] == why, (device, why)
    assert f"{token_hash(unused)}:{fresh}" not in rebuilt  # never enrolled: still good

    # A bucket writer clears `used` on the spent claim: the rebuilt list still refuses it.
    _edit(idfleet, f"{CLAIMS}/{token_hash(first)}.json", lambda doc: doc["used"].clear())
    again = _claim(idfleet, enrolled, first)
    assert (again["ok"], again["reason"]) == (False, "token_reused"), again
    assert _claim(idfleet, revoked, fast)["reason"] == "revoked"
    # The claim never spent enrolls, and so does a claim made for the revoked device now.
    assert _claim(idfleet, fresh, unused)["ok"] is True
    new = idfleet.ids.create_claims([revoked], ttl_s=600)[revoked]
    assert _claim(idfleet, revoked, new)["ok"] is True

    # Lost beside the CRL's last good copy (a host moved without it): refused naming the
    # command, rebuilt with nothing to keep aside, and the spent claim still refused.
    later = f"sl-{tag}"
    token = idfleet.ids.create_claims([later], ttl_s=600)[later]
    listed.unlink()
    lost = _claim(idfleet, later, token)
    assert (lost["ok"], lost["reason"]) == (False, "record_refused"), lost
    assert "is missing" in lost["error"] and "rebuild-spent-claims" in lost["error"], lost
    assert _unreadable(idfleet) == 1.0
    assert _rebuild(idfleet)["damaged"] is None
    assert _claim(idfleet, enrolled, first)["reason"] == "token_reused"
    assert _claim(idfleet, later, token)["ok"] is True


def test_objects_a_bucket_writer_plants_under_claims_do_not_stop_the_rebuild(
    idfleet: IdentityFleet, s3_server: Any
) -> None:
    """A key the store refuses to read (``claims/x\\y.json``) and an unsigned object at a
    claim's key are skipped and counted, and the rebuild brings claims back. Previous code:
    the first stopped every rebuild with "run again" (every claim stayed refused for good)."""
    tag = uuid.uuid4().hex[:6]
    enrolled, fresh = f"pa-{tag}", f"pn-{tag}"
    token = idfleet.ids.create_claims([enrolled], ttl_s=3600)[enrolled]
    _enroll_over(idfleet, enrolled, token)
    unused = idfleet.ids.create_claims([fresh], ttl_s=3600)[fresh]
    bucket, prefix = idfleet.ids.store.url.removeprefix("s3://").split("/", 1)
    planted = {
        f"{prefix}/{CLAIMS}/x\\y.json": b"{}",
        f"{prefix}/{CLAIMS}/{'ab' * 32}.json": json.dumps(
            {"devices": [fresh], "expires_at": 2e9, "used": {}}
        ).encode(),  # at a claim's key, not signed
    }
    for key, body in planted.items():
        s3_server.client().put_object(Bucket=bucket, Key=key, Body=body)
    listed = spent_path(idfleet.ca.paths.crl)
    listed.write_bytes(b'{"v":1,"claims":{"')  # damaged

    report = _rebuild(idfleet)
    assert report["skipped_count"] >= 2, report
    assert any("x" in key and "y.json" in key for key in report["skipped"]), report
    rebuilt = json.loads(listed.read_text())["claims"]
    assert rebuilt[f"{token_hash(token)}:{enrolled}"]["why"] == "spent"
    assert _claim(idfleet, enrolled, token)["reason"] == "token_reused"
    assert _claim(idfleet, fresh, unused)["ok"] is True


def _enroll_over(fleet: IdentityFleet, device: str, token: str) -> None:
    answer = _claim(fleet, device, token)
    assert answer["ok"] is True, answer
