"""A broker restarted (kill -9, as the demo does) comes back with another pid: the CRL reloads of
``fleet revoke`` and the enrollment service must reach the broker that runs now. The generated
configuration writes a ``pid_file``, and ``--broker-pid-file`` reads it at each reload (issue 20:
the demo's devices run on the generated configuration through a broker kill)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.fleet_ca import FleetCA, load_cert, tls_context
from cloud_sync.identity_store import IdentityStore
from cloud_sync.store import open_store
from tests.support.agent import REPO
from tests.support.services import free_port, mosquitto_binary, wait_for_port

DEVICE = "cam-9"


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgebento", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


class _Broker:
    def __init__(self, conf: Path, log: Path, port: int) -> None:
        self.conf, self.log, self.port = conf, log, port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def restarted(tmp_path: Path) -> Iterator[dict[str, object]]:
    """The generated configuration's broker, killed with -9 and started again, and a device
    with a certificate of the fleet recorded as enrolled."""
    ca, ids, conf = tmp_path / "ca", tmp_path / "ids", tmp_path / "broker"
    assert _cli("fleet", "ca", "init", "--out", ca).returncode == 0
    issued = _cli("fleet", "ca", "issue", "--out", ca, "--name", DEVICE, "--name", "x", "--to", ids)
    assert issued.returncode == 0, issued.stderr
    assert f"{DEVICE}: " in issued.stdout and "x: " in issued.stdout  # both, one command
    port = free_port()
    made = _cli(
        "fleet", "broker-config", "--out", conf, "--ca", ca, "--bind", "127.0.0.1",
        "--port", str(port), "--claim-port", str(free_port()),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    text = (conf / "mosquitto.conf").read_text()
    assert f"pid_file {conf / 'data' / 'mosquitto.pid'}" in text.splitlines()
    if os.geteuid() == 0:  # as root Mosquitto would drop to a user who cannot write tmp_path
        (conf / "mosquitto.conf").write_text(text + "user root\n")
    store = str(tmp_path / "store")
    IdentityStore(open_store(store), FleetCA.load(ca)).record_issue(
        DEVICE, load_cert((ids / f"{DEVICE}.crt").read_bytes()), via="claim"
    )
    broker = _Broker(conf / "mosquitto.conf", tmp_path / "mosquitto.log", port)
    broker.start()
    first = broker.process.pid  # type: ignore[union-attr]
    broker.kill()
    broker.start()
    assert broker.process is not None and broker.process.pid != first
    yield {"ca": ca, "ids": ids, "conf": conf, "store": store, "port": port, "old_pid": first}
    broker.stop()


def _connects(ca: Path, ids: Path, port: int) -> bool:
    """Whether the broker accepts the device's certificate: a CONNACK that says success (a
    refused handshake can surface only once the client reads, after ``connect`` returned)."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5)
    client.tls_set_context(
        tls_context(ca / "ca-bundle.pem", ids / f"{DEVICE}.crt", ids / f"{DEVICE}.key")
    )
    answered, accepted = threading.Event(), threading.Event()

    def on_connect(*args: object) -> None:
        if not getattr(args[3], "is_failure", True):
            accepted.set()
        answered.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_a: answered.set()
    try:
        client.connect("127.0.0.1", port, 10)
    except (ssl.SSLError, OSError):
        return False
    client.loop_start()
    try:
        assert answered.wait(30), "neither a CONNACK nor a disconnect"
        return accepted.is_set()
    finally:
        client.disconnect()
        client.loop_stop()


def test_revoke_reaches_the_restarted_broker_through_its_pid_file(
    restarted: dict[str, object],
) -> None:
    ca, ids, conf, port = (restarted[k] for k in ("ca", "ids", "conf", "port"))
    assert isinstance(ca, Path) and isinstance(ids, Path) and isinstance(conf, Path)
    assert isinstance(port, int)
    assert _connects(ca, ids, port)
    flags = ["--store", restarted["store"], "--ca", ca, "--crl-file", conf / "crl.pem"]
    # The pid the broker had when it was set up is gone: said so, not a silent no-op.
    stale = _cli("fleet", "revoke", DEVICE, *flags, "--broker-pid", str(restarted["old_pid"]))
    assert stale.returncode != 0 and "no broker runs as pid" in stale.stderr, stale.stderr
    done = _cli(
        "fleet", "revoke", DEVICE, *flags, "--broker-pid-file", conf / "data" / "mosquitto.pid",
        "--broker", f"mqtts://127.0.0.1:{port}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revoked"] is True
    assert not _connects(ca, ids, port)  # the broker that runs now read the new CRL
