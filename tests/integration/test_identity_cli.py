"""The identity commands end to end, as an operator runs them (issue 20): `fleet ca init`,
`ca issue`, `broker-config` (the real Mosquitto runs the generated file), `claim`,
`enroll-service` (its own process, with metrics), real agents enrolling, `fleet revoke`, and
`fleet identity`."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.fleet_ca import tls_context
from edgebento.localports import PortTaken, wait_serving
from tests.support.agent import REPO, Client, wait_for, wait_online
from tests.support.identity_cli import start_enroll_service
from tests.support.services import free_port, mosquitto_binary

PREFIX = "edgebento"


def _cli(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "edgebento", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


class _Broker:
    """What the tests' agent process needs of a broker: its URL."""

    def __init__(self, port: int, claim_port: int) -> None:
        self.port, self.claim_port = port, claim_port
        self.url = f"mqtts://127.0.0.1:{port}"


def _broker(tmp_path: Path, ca: Path, conf: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    """Mosquitto on the configuration ``fleet broker-config`` wrote, and its two ports. A port
    is free only until someone binds it: one another process took between ``free_port`` and
    Mosquitto's start (a connect there would reach that process) is replaced by a new one."""
    for _ in range(5):
        port, claim_port = free_port(), free_port()
        if port == claim_port:
            continue
        _cli(
            "fleet", "broker-config", "--out", str(conf), "--ca", str(ca), "--bind", "127.0.0.1",
            "--port", str(port), "--claim-port", str(claim_port),
        )  # fmt: skip
        text = (conf / "mosquitto.conf").read_text()
        if os.geteuid() == 0:  # as root Mosquitto would drop to a user who cannot read tmp_path
            (conf / "mosquitto.conf").write_text(text + "user root\n")
        broker = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "mosquitto.log").open("ab"),
        )
        try:
            wait_serving(broker, [port, claim_port])
        except PortTaken:
            continue
        except BaseException:
            broker.kill()
            raise
        return broker, port, claim_port
    raise AssertionError("Mosquitto found its ports taken 5 times")


def _enroll_service(
    tmp_path: Path, ca: Path, ids: Path, conf: Path, store: str, broker_pid: int, port: int
) -> tuple[subprocess.Popen[bytes], int]:
    """``fleet enroll-service`` in its own process, and the port of its /metrics."""
    return start_enroll_service(
        [
            "--broker", f"mqtts://127.0.0.1:{port}", "--ca", str(ca),
            "--cert", str(ids / "enroll.crt"), "--key", str(ids / "enroll.key"),
            "--store", store, "--crl-file", str(conf / "crl.pem"),
            "--broker-pid", str(broker_pid), "--metrics-refresh", "0.2", "--crl-refresh", "2s",
        ],
        tmp_path / "enroll.log",
    )  # fmt: skip


def _tls_client(ca: Path, ids: Path, name: str, port: int) -> Client:
    """A test client with the certificate ``ids/NAME.crt`` (its CN is its client id)."""
    import paho.mqtt.client as mqtt

    client = Client.__new__(Client)
    client.v5, client.queues = True, {}
    client.client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5
    )
    client.client.tls_set_context(
        tls_context(ca / "ca-bundle.pem", ids / f"{name}.crt", ids / f"{name}.key")
    )
    client.client.on_message = client._on_message
    client.client.connect("127.0.0.1", port, 30)
    client.client.loop_start()
    return client


def _wait_answering(ca: Path, ids: Path, claim_port: int, timeout: float = 60.0) -> None:
    """Until the enrollment service answers on the claim listener. Its /metrics comes up before
    the broker has confirmed its subscriptions, and a claim sent before that is lost (a device
    asks again only after 10 s): a junk claim, asked again each second, until it is refused."""
    probe = _tls_client(ca, ids, "claim", claim_port)
    answers = probe.collect(f"{PREFIX}/enroll/ready-probe/response")
    deadline = time.monotonic() + timeout
    try:
        while True:
            probe.publish(f"{PREFIX}/enroll/ready-probe/claim", {})
            try:
                answers.get(timeout=1.0)
                return
            except queue.Empty:
                assert time.monotonic() < deadline, f"no enrollment answer within {timeout}s"
    finally:
        probe.close()


@pytest.fixture
def operator_setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ca, ids, conf = tmp_path / "ca", tmp_path / "ids", tmp_path / "broker"
    _cli("fleet", "ca", "init", "--out", str(ca))
    for name in ("enroll", "claim", "operator"):
        _cli("fleet", "ca", "issue", "--out", str(ca), "--name", name, "--to", str(ids))
    broker, port, claim_port = _broker(tmp_path, ca, conf)
    store = str(tmp_path / "store")
    service, metrics = _enroll_service(tmp_path, ca, ids, conf, store, broker.pid, port)
    _wait_answering(ca, ids, claim_port)
    yield {
        "ca": ca, "ids": ids, "conf": conf, "store": store, "broker": _Broker(port, claim_port),
        "pid": broker.pid, "metrics": metrics, "service": service,
    }  # fmt: skip
    service.terminate()
    service.wait(10)
    broker.terminate()
    broker.wait(10)


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(found[0].split()[-1]) if found else 0.0


def _metric_reaches(port: int, name: str, value: float, timeout: float = 20.0) -> None:
    """Until the service's /metrics says ``value``: it reads the store at most every
    ``--metrics-refresh`` and hears statuses over MQTT, so a change made a moment ago by another
    process shows after a while, not at once."""
    deadline = time.monotonic() + timeout
    while (seen := _metric(port, name)) != value:
        assert time.monotonic() < deadline, f"{name} is {seen}, not {value}"
        time.sleep(0.1)


def test_operator_enrolls_two_devices_and_revokes_one(
    operator_setup: dict[str, Any], agent_factory: Any, tmp_path: Path
) -> None:
    s = operator_setup
    tokens = json.loads(
        _cli(
            "fleet",
            "claim",
            "--devices",
            "cli-a,cli-b",
            "--store",
            s["store"],
            "--ca",
            str(s["ca"]),
        )
    )
    assert set(tokens["claims"]) == {"cli-a", "cli-b"}
    args = [
        "--ca-file", str(s["ca"] / "ca-bundle.pem"),
        "--claim-broker", f"mqtts://127.0.0.1:{s['broker'].claim_port}",
        "--claim-cert", str(s["ids"] / "claim.crt"), "--claim-key", str(s["ids"] / "claim.key"),
    ]  # fmt: skip
    for device in ("cli-a", "cli-b"):
        agent_factory(
            broker=s["broker"],
            device=device,
            data_dir=tmp_path / f"agent-{device}",
            prefix=PREFIX,
            args=(*args, "--enroll", tokens["claims"][device]),
        )
    operator = _tls_client(s["ca"], s["ids"], "operator", s["broker"].port)
    wait_online(operator, PREFIX, "cli-a")
    wait_online(operator, PREFIX, "cli-b")
    # The cloud's commands reach an mTLS broker with an identity of their own.
    as_operator = {
        "EDGEBENTO_MQTT_CA_FILE": str(s["ca"] / "ca-bundle.pem"),
        "EDGEBENTO_MQTT_CERT_FILE": str(s["ids"] / "operator.crt"),
        "EDGEBENTO_MQTT_KEY_FILE": str(s["ids"] / "operator.key"),
    }
    url = f"mqtts://127.0.0.1:{s['broker'].port}"
    fleet = json.loads(_cli("fleet", "status", "--broker", url, "--json", env=as_operator))
    assert {d: v["state"] for d, v in fleet["devices"].items()} == {
        "cli-a": "online",
        "cli-b": "online",
    }
    # With --store and --ca, fleet status shows each device's certificate too, checked.
    args_store = ("--store", s["store"], "--ca", str(s["ca"]), "--json")
    fleet = json.loads(_cli("fleet", "status", "--broker", url, *args_store, env=as_operator))
    assert fleet["devices"]["cli-a"]["identity"]["state"] == "valid"
    table = _cli("fleet", "status", "--broker", url, *args_store[:-1], env=as_operator)
    assert "certificate" in table and "90d left" in table
    statuses = operator.collect(f"{PREFIX}/cli-a/status")
    out = _cli(
        "fleet", "revoke", "cli-a", "--store", s["store"], "--ca", str(s["ca"]),
        "--crl-file", str(s["conf"] / "crl.pem"), "--broker-pid", str(s["pid"]),
        "--broker", f"mqtts://127.0.0.1:{s['broker'].port}",
    )  # fmt: skip
    result = json.loads(out)
    print("revocation:", result)
    # How long it took is printed, not asserted: a loaded machine decides it, not the code.
    assert result["session_dropped"] is True
    wait_for(statuses, lambda d: d.get("state") == "offline", 10)
    rows = json.loads(_cli("fleet", "identity", "--store", s["store"], "--json"))["devices"]
    assert rows["cli-a"]["state"] == "revoked" and rows["cli-b"]["state"] == "valid"
    assert rows["cli-b"]["expires_in_s"] > 89 * 86400
    _metric_reaches(s["metrics"], "edgebento_identity_revoked_devices", 1)
    _metric_reaches(s["metrics"], "edgebento_identity_revoked_connected_devices", 0)
    assert _metric(s["metrics"], 'edgebento_enrollments_total{kind="claim"}') == 2
    assert _metric(s["metrics"], 'edgebento_identity_cert_expiry_seconds{device="cli-b"}') > 0
    # The CRL the broker reads is 30 days from its nextUpdate (EdgebentoCrlStale at 7).
    crl_left = _metric(s["metrics"], "edgebento_identity_crl_next_update_seconds")
    assert 29 * 86400 < crl_left <= 30 * 86400, crl_left
    # Revoked in the store and the CRL but its session left alone (no --broker): the metric
    # that an alert watches sees a revoked device that is still connected.
    _cli(
        "fleet", "revoke", "cli-b", "--store", s["store"], "--ca", str(s["ca"]),
        "--crl-file", str(s["conf"] / "crl.pem"), "--broker-pid", str(s["pid"]),
    )  # fmt: skip
    _metric_reaches(s["metrics"], "edgebento_identity_revoked_connected_devices", 1)
    # The service rewrites the CRL on its own, so that it never passes its nextUpdate.
    from cryptography import x509

    crl_file = s["conf"] / "crl.pem"
    first = x509.load_pem_x509_crl(crl_file.read_bytes()).last_update_utc
    deadline = time.monotonic() + 20
    while x509.load_pem_x509_crl(crl_file.read_bytes()).last_update_utc == first:
        assert time.monotonic() < deadline, "the CRL was not refreshed"
        time.sleep(0.5)
    operator.client.disconnect()
    operator.client.loop_stop()
