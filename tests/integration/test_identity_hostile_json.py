"""An identity object a bucket writer planted that Python's JSON parser refuses with something
other than JSONDecodeError: a 5,000-digit integer (``ValueError``) or arrays nested 5,000 deep
(``RecursionError``). On the previous code the first escaped ``cloud_sync.sealed.parse``,
which every reader of identity records goes through: the renewal, the CRL refresh, `fleet status
--ca` and identity-repair each failed on the one object instead of refusing it as ``malformed``
(the deep one was refused by pydantic first: kept here so that it stays so). Moto's
S3 server, the real enrollment service over Mosquitto with mTLS, the CLI as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sync.identity_records import RecordRefused
from cloud_sync.revocation import publish_crl
from tests.integration.test_identity_store_writer import _cli, _enroll, _key, _renew, idfleet
from tests.support.identity_cli import as_operator, fleet_cli
from tests.support.identity_fleet import IdentityFleet
from tests.support.services import MotoS3

__all__ = ["idfleet"]

HOSTILE = {
    "digits": b'{"device": "x", "n": ' + b"1" * 5000 + b"}",
    "deep": b'{"device": "x", "n": ' + b"[" * 5000 + b"]" * 5000 + b"}",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_planted_record_that_is_not_json_is_refused_by_every_reader(
    idfleet: IdentityFleet, s3_server: MotoS3, tmp_path: Path, kind: str
) -> None:
    device, planted = f"ok-{kind}", f"bad-{kind}"
    _enroll(idfleet, device, tmp_path)
    idfleet.ids.store.put_bytes(_key(planted), HOSTILE[kind])
    # The enrollment service: a renewal of the device whose record is the planted one.
    answer = _renew(idfleet, planted)
    assert (answer["ok"], answer["reason"]) == (False, "record_refused"), answer
    with pytest.raises(RecordRefused) as refused:
        idfleet.ids.device(planted)
    assert refused.value.reason == "malformed"
    # The CRL refresh reads every record: the planted one is left out, the others written.
    publish_crl(idfleet.ca, idfleet.ids, idfleet.ca.paths.crl, None, first=True, records=True)
    assert idfleet.ids.refused_records[planted] == "malformed"
    assert device not in idfleet.ids.refused_records
    # fleet status and identity-repair, as an operator runs them.
    store, ca = str(idfleet.store_url), str(idfleet.root / "ca")
    endpoint = ("--endpoint-url", s3_server.endpoint_url)
    table = fleet_cli(
        "fleet", "status", "--broker", idfleet.broker.url, "--store", store, "--ca", ca,
        *endpoint, env=as_operator(idfleet),
    )  # fmt: skip
    line = next((ln for ln in table.splitlines() if ln.startswith(planted)), table)
    assert "record refused (malformed)" in line, table
    crl = str(idfleet.ca.paths.crl)
    repair = ("fleet", "identity-repair", "--ca", ca, "--crl-file", crl, "--store", store)
    report = json.loads(_cli(*repair, *endpoint).stdout)  # exit 1: something refused
    assert planted in report["refused"], report
