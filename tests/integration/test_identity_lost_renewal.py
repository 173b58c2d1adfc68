"""A renewal whose answer is lost leaves the device on its old certificate, which must keep
working: the old certificate is retired (listed in the CRL) only once the device shows that it
holds the new one (``rotated``, sent over a connection made with it), or after the grace when
it never says so. Before, it was retired when the new one was signed, and the next CRL locked
the device out of the certificate it ran with until an operator made it a new claim. A bucket
on moto's S3 server, Mosquitto with mTLS (the TLS handshake is what decides), the real
enrollment service over MQTT, the CRL writer the service and the refresh use."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from cloud_sync.enroll import enroll_topic
from cloud_sync.fleet_ca import load_cert, new_key, write_private
from cloud_sync.identity_records import DeviceIdentity
from cloud_sync.revocation import publish_crl
from edge_agent.identity import KeyMaker
from tests.integration.test_identity_store_writer import _connects, _enroll, idfleet
from tests.support.agent import wait_for
from tests.support.identity_cli import fleet_cli
from tests.support.identity_fleet import PREFIX, IdentityFleet, TlsClient, claim_request
from tests.support.services import MotoS3

__all__ = ["idfleet"]


def _record(fleet: IdentityFleet, device: str) -> DeviceIdentity:
    doc = fleet.ids.device(device)
    assert doc is not None
    return doc


def _as_device(fleet: IdentityFleet, device: str, files: Path) -> TlsClient:
    """An MQTT client of the device, connected with the certificate in ``files``."""
    fleet.certs[device] = (files / "d.crt", files / "d.key")
    return fleet.client(device)


def _renewal(device: str, tmp: Path) -> tuple[bytes, Path]:
    """A renewal request with a fresh key; the directory the key is kept in."""
    key, where = new_key(), tmp / f"{device}-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    write_private(where / "d.key", key)
    return claim_request(KeyMaker().csr(key, device), None), where


def _renew_unanswered(fleet: IdentityFleet, device: str, files: Path, tmp: Path) -> str:
    """The device asks to renew over its certificate and never hears back (its connection
    dropped before the answer): the serial the service signed, which the device lacks."""
    before = _record(fleet, device).certificates[-1].serial
    client = _as_device(fleet, device, files)
    client.publish(enroll_topic(PREFIX, device, "renew"), _renewal(device, tmp)[0])
    client.close()  # no subscription to the response: the answer is lost
    deadline = time.monotonic() + 20
    while _record(fleet, device).certificates[-1].serial == before:
        assert time.monotonic() < deadline, "the renewal was never served"
        time.sleep(0.1)
    return _record(fleet, device).certificates[-1].serial


def _ask(client: TlsClient, device: str, kind: str, payload: bytes) -> dict[str, Any]:
    answers = client.collect(enroll_topic(PREFIX, device, "response"))
    client.publish(enroll_topic(PREFIX, device, kind), payload)
    request_id = json.loads(payload)["id"]
    return dict(wait_for(answers, lambda d: d.get("id") == request_id, 20))


def _crl_in_force(fleet: IdentityFleet, tmp: Path, device: str) -> None:
    """A CRL written now (the refresh's, records and all) and loaded by the broker: a control
    certificate revoked in the same write is refused in the handshake (a SIGHUP is
    asynchronous), so what the CRL does not list is known to be let in on its merits."""
    control = f"ctl-{device}"
    cert_file, key_file = fleet.ca.issue_identity(control, tmp / control, 1.0)
    cert = load_cert(cert_file.read_bytes())
    fleet.ids.revoke_serial(cert.serial_number, cert.not_valid_after_utc.timestamp())
    assert fleet.broker.process is not None
    publish_crl(fleet.ca, fleet.ids, fleet.ca.paths.crl, fleet.broker.process.pid, records=True)
    (tmp / control / "d.crt").write_bytes(cert_file.read_bytes())
    (tmp / control / "d.key").write_bytes(key_file.read_bytes())
    deadline = time.monotonic() + 20
    while _connects(fleet, tmp / control):
        assert time.monotonic() < deadline, "the broker never loaded the CRL"
        time.sleep(0.2)


def _listed(fleet: IdentityFleet) -> set[str]:
    return {format(s, "x") for s in fleet.ca.crl_entries(fleet.ca.paths.crl)}


def _identity_cli(fleet: IdentityFleet, s3_server: MotoS3) -> dict[str, Any]:
    store, endpoint = str(fleet.store_url), s3_server.endpoint_url
    ca = str(fleet.root / "ca")
    args = ("--store", store, "--endpoint-url", endpoint, "--ca", ca, "--json")
    return dict(json.loads(fleet_cli("fleet", "identity", *args)))


def test_a_lost_renewal_answer_leaves_the_device_on_its_certificate_until_it_rotates(
    idfleet: IdentityFleet, tmp_path: Path, s3_server: MotoS3
) -> None:
    device = "lost-a"
    files = _enroll(idfleet, device, tmp_path)
    first = _record(idfleet, device).current
    lost = _renew_unanswered(idfleet, device, files, tmp_path)
    record = _record(idfleet, device)
    assert (record.current, record.pending, record.retired) == (first, [lost], [])
    # A CRL is written (the refresh, another device's rotation): the device still gets in.
    _crl_in_force(idfleet, tmp_path, device)
    assert first not in _listed(idfleet) and lost not in _listed(idfleet)
    assert _connects(idfleet, files), "locked out of the certificate it runs with"
    # What an operator reads: the certificate it runs with, and the renewal unconfirmed.
    shown = _identity_cli(idfleet, s3_server)
    assert shown["devices"][device]["serial"] == first, shown
    assert shown["devices"][device]["pending"] == [lost], shown

    # It renews again over the same certificate, and this answer arrives.
    client = _as_device(idfleet, device, files)
    payload, new = _renewal(device, tmp_path)
    answer = _ask(client, device, "renew", payload)
    client.close()
    assert answer["ok"] is True, answer
    (new / "d.crt").write_text(answer["certificate"])
    serial = format(load_cert(answer["certificate"].encode()).serial_number, "x")
    assert _record(idfleet, device).pending == [lost, serial]
    assert _connects(idfleet, files) and _connects(idfleet, new)
    # Connected with the new certificate, it says so: now the old one and the lost one go.
    client = _as_device(idfleet, device, new)
    answer = _ask(client, device, "rotated", json.dumps({"id": "r1", "serial": serial}).encode())
    client.close()
    assert answer["ok"] is True, answer
    record = _record(idfleet, device)
    assert (record.current, record.pending) == (serial, [])
    assert set(record.retired) == {first, lost} and record.last_rotation is not None
    assert {first, lost} <= _listed(idfleet)  # the service wrote the CRL (on_retired)
    deadline = time.monotonic() + 20
    while _connects(idfleet, files):
        assert time.monotonic() < deadline, "the replaced certificate still connects"
        time.sleep(0.2)
    assert _connects(idfleet, new)


def test_a_renewal_never_confirmed_is_settled_after_the_grace(
    idfleet: IdentityFleet, tmp_path: Path
) -> None:
    """The device got its certificate but its ``rotated`` was lost: after the grace the CRL
    refresh takes the newest as current and retires the old one all the same."""
    device = "lost-b"
    files = _enroll(idfleet, device, tmp_path)
    first = _record(idfleet, device).current
    lost = _renew_unanswered(idfleet, device, files, tmp_path)
    _crl_in_force(idfleet, tmp_path, device)  # within the grace: nothing retired
    assert _record(idfleet, device).pending == [lost] and first not in _listed(idfleet)
    grace, idfleet.ids.rotation_grace_s = idfleet.ids.rotation_grace_s, 0.0
    try:
        _crl_in_force(idfleet, tmp_path, f"{device}-2")
    finally:
        idfleet.ids.rotation_grace_s = grace
    record = _record(idfleet, device)
    assert (record.current, record.pending, record.retired) == (lost, [], [first])
    assert first in _listed(idfleet) and lost not in _listed(idfleet)
    assert not _connects(idfleet, files)
