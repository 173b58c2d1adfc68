"""Every identity object is read up to a size limit (a record 64 KiB, a claim 4 MiB, the index
1 MiB + 2 KiB a device record): one planted bigger under fleet/identity/ is refused as
``malformed`` and counted, having been asked of S3 as a ranged GET of at most the limit + 1
bytes, never read whole into memory by the enrollment service, the CRL refresh, `fleet status`
or identity-repair. A bucket on moto's S3 server (real boto3 calls: the requests are watched
through botocore's own event hooks, not replaced), the real enrollment service over Mosquitto
with mTLS, the CLI as a user runs it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.identity_claims import CLAIMS, token_hash
from cloud_sync.identity_records import (
    CLAIM_MAX_BYTES,
    RECORD_MAX_BYTES,
    RecordRefused,
    index_max_bytes,
)
from cloud_sync.identity_store import CRL_INDEX
from cloud_sync.revocation import publish_crl
from tests.integration.test_identity_store_writer import _cli, _enroll, _key, _renew, idfleet
from tests.support.identity_cli import as_operator, fleet_cli
from tests.support.identity_fleet import IdentityFleet
from tests.support.services import MotoS3

__all__ = ["idfleet"]


class GetObjects:
    """The GetObject calls the store's boto3 client makes: the Range asked, the bytes sent."""

    def __init__(self, client: Any) -> None:
        self.client, self.calls = client, list[dict[str, Any]]()
        client.meta.events.register("provide-client-params.s3.GetObject", self._asked)
        client.meta.events.register("after-call.s3.GetObject", self._sent)

    def _asked(self, params: dict[str, Any], **_: Any) -> None:
        self.calls.append({"key": params["Key"], "range": params.get("Range")})

    def _sent(self, parsed: dict[str, Any], **_: Any) -> None:
        self.calls[-1]["length"] = parsed.get("ContentLength")
        self.calls[-1]["status"] = parsed["ResponseMetadata"]["HTTPStatusCode"]

    def of(self, key: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["key"].endswith(key)]

    def close(self) -> None:
        self.client.meta.events.unregister("provide-client-params.s3.GetObject", self._asked)
        self.client.meta.events.unregister("after-call.s3.GetObject", self._sent)


@pytest.fixture
def watched(idfleet: IdentityFleet) -> Iterator[GetObjects]:
    calls = GetObjects(idfleet.ids.store.client)  # type: ignore[attr-defined]
    yield calls
    calls.close()


def _planted(fleet: IdentityFleet, key: str, size: int) -> None:
    """What a writer to the bucket plants: valid JSON, padded past ``size``."""
    padding = "x" * size
    fleet.ids.store.put_bytes(key, json.dumps({"device": "pad", "padding": padding}).encode())


def _bounded(calls: list[dict[str, Any]], limit: int) -> None:
    """Each read asked for at most ``limit`` + 1 bytes and got no more than it asked."""
    assert calls, "the object was never read"
    for call in (c for c in calls if c["status"] != 404):  # 404: before it was written
        assert str(call["range"]).startswith("bytes=0-"), call
        asked = int(call["range"].removeprefix("bytes=0-"))
        assert asked <= limit and call["length"] is not None, call
        assert call["length"] <= asked + 1, call


def test_a_huge_record_is_refused_by_every_reader_unread(
    idfleet: IdentityFleet, watched: GetObjects, s3_server: MotoS3, tmp_path: Path
) -> None:
    device, big = "big-a", "big-b"
    _enroll(idfleet, device, tmp_path)
    _planted(idfleet, _key(big), 4 * RECORD_MAX_BYTES)
    before = idfleet.ids.refused[("device", "malformed")]
    # The enrollment service: a renewal of the device whose record is the huge one.
    answer = _renew(idfleet, big)
    assert (answer["ok"], answer["reason"]) == (False, "record_refused"), answer
    assert f"over {RECORD_MAX_BYTES} bytes" in answer["error"], answer
    with pytest.raises(RecordRefused) as refused:
        idfleet.ids.device(big)
    assert refused.value.reason == "malformed"
    # The CRL refresh reads every record: the huge one is left out, the others written.
    assert idfleet.broker.process is not None
    publish_crl(idfleet.ca, idfleet.ids, idfleet.ca.paths.crl, None, first=True, records=True)
    assert idfleet.ids.refused_records[big] == "malformed"
    assert device not in idfleet.ids.refused_records
    assert idfleet.ids.refused[("device", "malformed")] >= before + 3
    _bounded(watched.of(_key(big)), RECORD_MAX_BYTES)
    _bounded(watched.of(_key(device)), RECORD_MAX_BYTES)
    # fleet status and identity-repair, as an operator runs them.
    store, ca = str(idfleet.store_url), str(idfleet.root / "ca")
    endpoint = ("--endpoint-url", s3_server.endpoint_url)
    table = fleet_cli(
        "fleet", "status", "--broker", idfleet.broker.url, "--store", store, "--ca", ca,
        *endpoint, env=as_operator(idfleet),
    )  # fmt: skip
    line = next((ln for ln in table.splitlines() if ln.startswith(big)), table)
    assert "record refused (malformed)" in line, table
    crl = str(idfleet.ca.paths.crl)
    repair = ("fleet", "identity-repair", "--ca", ca, "--crl-file", crl, "--store", store)
    report = json.loads(_cli(*repair, *endpoint).stdout)  # exit 1: something refused
    assert f"over {RECORD_MAX_BYTES} bytes" in report["refused"][big], report
    # A revocation replaces it whole with a signed, revoked record.
    idfleet.ids.revoke(big)
    doc = idfleet.ids.device(big)
    assert doc is not None and doc.revoked


def test_a_huge_claim_and_a_huge_index_are_refused_unread(
    idfleet: IdentityFleet, watched: GetObjects
) -> None:
    device = "big-c"
    token = "ebc1.planted-huge-claim"
    _planted(idfleet, f"{CLAIMS}/{token_hash(token)}.json", 2 * CLAIM_MAX_BYTES)
    from cloud_sync.fleet_ca import new_key
    from edge_agent.identity import KeyMaker
    from tests.support.identity_fleet import claim_request

    answer = idfleet.ask_claim(device, claim_request(KeyMaker().csr(new_key(), device), token))
    assert (answer["ok"], answer["reason"]) == (False, "malformed_claim"), answer
    _bounded(watched.of(f"{token_hash(token)}.json"), CLAIM_MAX_BYTES)

    idfleet.ids.fleet_size = 0  # as a CRL writer that has not counted the fleet yet
    limit = index_max_bytes(len(idfleet.ids.store.list("fleet/identity/devices/")))
    _planted(idfleet, CRL_INDEX, 2 * limit)
    before = idfleet.ids.refused[("crl_index", "malformed")]
    with pytest.raises(RecordRefused) as refused:
        idfleet.ids.crl_index()
    assert refused.value.reason == "malformed"
    assert idfleet.ids.refused[("crl_index", "malformed")] == before + 1
    _bounded(watched.of(CRL_INDEX), limit)  # the floor, then the fleet counted: both ranged
    # The CRL is written from the signed records meanwhile; deleted, the index is rebuilt.
    publish_crl(idfleet.ca, idfleet.ids, idfleet.ca.paths.crl, None, first=True)
    idfleet.ids.store.delete(CRL_INDEX)
    assert idfleet.ids.crl_index().generation == 1
