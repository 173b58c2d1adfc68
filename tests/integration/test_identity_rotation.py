"""Certificate rotation under traffic with a real Mosquitto over mTLS and a real agent (issue
20): certificates that live 30 s are renewed at two thirds of their life, the agent reconnects
with the new one, the old one goes into the CRL, and no inference request and no telemetry
record is lost (`edgebento sync` ingests over mTLS with its own identity)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.fleet_ca import load_cert
from tests.support.agent import REPO, wait_online
from tests.support.identity_fleet import PREFIX, IdentityFleet


@pytest.fixture
def short_lived(tmp_path: Path) -> Iterator[IdentityFleet]:
    fleet = IdentityFleet(tmp_path / "fleet", validity_s=30.0).start()
    yield fleet
    fleet.stop()


def test_rotation_under_traffic_loses_no_request(
    short_lived: IdentityFleet,
    agent_factory: Any,
    pack_v1: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    from cryptography import x509

    fleet = short_lived
    store = tmp_path / "telemetry-store"
    cert, key = fleet.certs["sync"]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "EDGEBENTO_MQTT_CA_FILE": str(fleet.ca.paths.bundle),
        "EDGEBENTO_MQTT_CERT_FILE": str(cert),
        "EDGEBENTO_MQTT_KEY_FILE": str(key),
    }
    sync = subprocess.Popen(
        [sys.executable, "-m", "edgebento", "sync", "--broker", fleet.broker.url,
         "--store", str(store), "--prefix", PREFIX, "--flush-interval", "0.3"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "sync.log").open("ab"),
    )  # fmt: skip
    request.addfinalizer(lambda: sync.poll() is None and sync.kill())
    token = fleet.ids.create_claims(["rot-a"], ttl_s=600)["rot-a"]
    agent = agent_factory(
        broker=fleet.broker,
        device="rot-a",
        data_dir=tmp_path / "agent-rot-a",
        prefix=PREFIX,
        pack=pack_v1,
        args=fleet.agent_args(token),
    )
    operator = fleet.client("operator")
    wait_online(operator, PREFIX, "rot-a")
    operator.reply_topic = f"{PREFIX}/rot-a/replies/operator"
    operator.collect(operator.reply_topic)
    first = fleet.ids.device("rot-a")
    assert first is not None and first.current is not None
    sent = answered = 0
    deadline = time.monotonic() + 60
    rotated_at = None
    # Requests one after another until two seconds past the rotation: each must be answered.
    while time.monotonic() < deadline:
        reply = operator.request(f"{PREFIX}/rot-a/infer", {"inputs": {"x": [[0.1] * 8]}})
        sent += 1
        answered += bool(reply.get("outputs"))
        record = fleet.ids.device("rot-a")
        if rotated_at is None and record is not None and record.last_rotation is not None:
            rotated_at = time.monotonic()
        if rotated_at is not None and time.monotonic() > rotated_at + 2:
            break
    assert rotated_at is not None, agent.output()[-2000:]
    assert answered == sent and sent > 10
    after = fleet.ids.device("rot-a")
    assert after is not None and after.current != first.current
    assert first.current in after.retired
    # The device runs on the new certificate, and the old one is in the CRL the broker reads.
    on_disk = load_cert((agent.data_dir / "identity" / "device.crt").read_bytes())
    assert format(on_disk.serial_number, "x") == after.current
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        crl = x509.load_pem_x509_crl(fleet.ca.paths.crl.read_bytes())
        if crl.get_revoked_certificate_by_serial_number(int(first.current, 16)) is not None:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the old certificate never reached the CRL")
    assert "certificate rotated" in agent.output()
    operator.close()
    # Every telemetry record the agent numbered is stored, or still in its outbox.
    assert agent.process is not None
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(30) == 0
    # No wait for sync's next flush: it acknowledges a record to the device once it is stored,
    # and the agent kept none unacknowledged (asserted below), so each is in the store now.
    sync.terminate()
    sync.wait(30)
    from cloud_sync.parts import decode_jsonl_gz
    from cloud_sync.store import open_store

    telemetry = open_store(str(store))
    records = [
        r for k in telemetry.list("telemetry/") for r in decode_jsonl_gz(telemetry.get_bytes(k))
    ]
    seqs = sorted(r["seq"] for r in records if r["device"] == "rot-a")
    kept = int(agent.output().rsplit("stopped; ", 1)[1].split()[0])
    assert seqs and seqs == list(range(len(seqs))), "a gap: records lost"
    assert len(seqs) > 40 and kept == 0, (len(seqs), kept)
