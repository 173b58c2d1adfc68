"""What a device says of its certificate in its MQTT status, and ``edgebento fleet status``
showing the store's record beside it (issue 20): a real agent enrolled by claim reports its
serial, validity, issuer and when it renews; a device that lies about its certificate changes
nothing the cloud keeps and is flagged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.fleet_ca import load_cert
from tests.support.agent import REPO, wait_for, wait_online
from tests.support.identity_fleet import PREFIX, IdentityFleet


@pytest.fixture(scope="module")
def idfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityFleet]:
    fleet = IdentityFleet(tmp_path_factory.mktemp("idstatus")).start()
    yield fleet
    fleet.stop()


def _fleet_status(fleet: IdentityFleet, *extra: str) -> subprocess.CompletedProcess[str]:
    cert, key = fleet.certs["operator"]
    return subprocess.run(
        [
            sys.executable, "-m", "edgebento", "fleet", "status", "--broker", fleet.broker.url,
            "--store", str(fleet.root / "store"), "--ca", str(fleet.root / "ca"),
            "--listen", "0.5", *extra,
        ],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={
            **os.environ, "PYTHONPATH": str(REPO),
            "EDGEBENTO_MQTT_CA_FILE": str(fleet.ca.paths.bundle),
            "EDGEBENTO_MQTT_CERT_FILE": str(cert), "EDGEBENTO_MQTT_KEY_FILE": str(key),
        },
    )  # fmt: skip


def test_an_enrolled_agent_reports_its_certificate_and_fleet_status_agrees(
    idfleet: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    token = idfleet.ids.create_claims(["rep-a"], ttl_s=600)["rep-a"]
    agent = agent_factory(
        broker=idfleet.broker,
        device="rep-a",
        data_dir=tmp_path / "agent-rep-a",
        prefix=PREFIX,
        args=idfleet.agent_args(token),
    )
    operator = idfleet.client("operator")
    wait_online(operator, PREFIX, "rep-a", timeout=60)
    # Once the renewer has planned its renewal, the next status says when (a heartbeat later).
    statuses = operator.collect(f"{PREFIX}/rep-a/status")
    status = wait_for(statuses, lambda d: "renew_after" in (d.get("identity") or {}), 60)
    said = status["identity"]
    record = idfleet.ids.device("rep-a")
    assert record is not None and record.current_record() is not None
    cert = load_cert((agent.data_dir / "identity" / "device.crt").read_bytes())
    assert said["state"] == "valid"
    assert said["serial"] == record.current == format(cert.serial_number, "x")
    assert said["not_after"] == record.current_record().not_after  # type: ignore[union-attr]
    assert said["issuer"] == cert.issuer.rfc4514_string() and "issuing CA" in said["issuer"]
    assert 89 < said["days_left"] <= 90
    assert said["rotation_due"] is False
    life = said["not_after"] - said["not_before"]  # renewed at two thirds, jitter 3 % of it
    assert abs(said["renew_after"] - (said["not_before"] + life * 2 / 3)) <= 0.031 * life

    run = _fleet_status(idfleet, "--json")
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)["devices"]["rep-a"]
    assert row["identity_reported"]["serial"] == record.current
    assert row["identity"]["state"] == "valid" and row["identity"]["mismatch"] == []
    table = _fleet_status(idfleet)
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("rep-a"))
    assert str(record.current)[:8] in line and "otherwise" not in line, table.stdout
    # One connection per identity on the device listener (the CN is the client id): a client
    # left connected would take the next test's operator over, and the other way round.
    operator.close()


def test_a_device_that_lies_about_its_certificate_is_flagged_and_changes_nothing(
    idfleet: IdentityFleet,
) -> None:
    cert_file, _ = idfleet.device_cert("liar")
    idfleet.ids.record_issue("liar", load_cert(cert_file.read_bytes()), via="claim")
    idfleet.ids.revoke("liar")
    before = idfleet.ids.device("liar")
    liar = idfleet.client("liar")  # its own certificate: the ACL lets it write its own status
    forever = time.time() + 10 * 365 * 86400
    lie = {
        "schema_version": 1, "device": "liar", "state": "online",
        "identity": {"state": "valid", "serial": "deadbeef", "not_after": forever,
                     "days_left": 3650.0, "issuer": "CN=trust me"},
    }  # fmt: skip
    liar.publish(f"{PREFIX}/liar/status", lie, retain=True)

    run = _fleet_status(idfleet, "--json")
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)["devices"]["liar"]
    assert row["identity_reported"]["serial"] == "deadbeef"  # shown as the device's word
    # The store's record stands: revoked, its own serial; the disagreement is flagged.
    assert row["identity"]["state"] == "revoked"
    assert row["identity"]["serial"] == before.current  # type: ignore[union-attr]
    assert set(row["identity"]["mismatch"]) == {"serial", "not_after", "revoked"}
    assert idfleet.ids.device("liar") == before  # nothing the cloud keeps moved
    table = _fleet_status(idfleet)
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("liar"))
    assert "revoked" in line and "otherwise" in line, table.stdout
    liar.publish(f"{PREFIX}/liar/status", b"", retain=True)
    liar.close()


def test_a_claim_certificate_with_a_devices_id_knocks_it_off_once_and_it_comes_back(
    idfleet: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    """Measured on Mosquitto 2.0.11 (docs/fleet-identity.md): the claim listener's client ids
    cannot be kept apart from the devices', so a holder of the shared claim certificate can
    connect there with a device's id and take its session. The device sees a lost connection
    (2.0.11 sends no "session taken over" reason code), reconnects on its own certificate and
    takes the session back: the intruder is the one dropped."""
    import threading

    import paho.mqtt.client as mqtt

    from cloud_sync.fleet_ca import tls_context

    token = idfleet.ids.create_claims(["take-a"], ttl_s=600)["take-a"]
    agent_factory(
        broker=idfleet.broker,
        device="take-a",
        data_dir=tmp_path / "agent-take-a",
        prefix=PREFIX,
        args=idfleet.agent_args(token),
    )
    operator = idfleet.client("operator")
    before = wait_online(operator, PREFIX, "take-a", timeout=60)
    statuses = operator.collect(f"{PREFIX}/take-a/status")
    cert, key = idfleet.certs["claim"]
    thief = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="take-a",
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,  # once: one that keeps reconnecting keeps knocking it off
    )
    thief.tls_set_context(tls_context(idfleet.ca.paths.bundle, cert, key))
    accepted, dropped = threading.Event(), threading.Event()
    thief.on_connect = lambda *a: accepted.set() if not a[3].is_failure else None
    thief.on_disconnect = lambda *_a: dropped.set()
    thief.connect("127.0.0.1", idfleet.broker.claim_port, 30)
    thief.loop_start()
    try:
        assert accepted.wait(30), "the claim listener refused the claim certificate"
        assert dropped.wait(60), "the device did not take its session back"
        # A status written after the takeover: the device connected again, on its own.
        wait_for(statuses, lambda d: d.get("state") == "online" and d["ts"] > before["ts"], 60)
    finally:
        thief.disconnect()
        thief.loop_stop()
        operator.close()


def test_a_device_started_before_the_enrollment_service_enrolls_once_it_runs(
    idfleet: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    """Its first claim reaches no service (none is subscribed, so the broker drops it): the
    device asks again, the same request, until one answers (it used to give up after 20 s)."""
    operator = idfleet.client("operator")
    claims = operator.collect(f"{PREFIX}/enroll/early-a/claim")
    idfleet.service.stop()
    restarted = False
    try:
        token = idfleet.ids.create_claims(["early-a"], ttl_s=600)["early-a"]
        agent_factory(
            broker=idfleet.broker,
            device="early-a",
            data_dir=tmp_path / "agent-early-a",
            prefix=PREFIX,
            args=idfleet.agent_args(token),
        )
        wait_for(claims, lambda d: "csr" in d, 60)  # sent, and nobody there to answer it
        idfleet.service.serve(idfleet.broker.url, idfleet.context("enroll"), PREFIX)
        restarted = True
        wait_online(operator, PREFIX, "early-a", timeout=90)
        assert idfleet.service.refusals["token_reused"] == 0  # one claim answered, once
    finally:
        if not restarted:
            idfleet.service.serve(idfleet.broker.url, idfleet.context("enroll"), PREFIX)
        operator.close()
