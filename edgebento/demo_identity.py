"""The demo's identity step (docs/fleet-identity.md): a fleet CA, Mosquitto with mTLS and the
generated ACL, three devices enrolled by claim, a device that cannot speak for another, a
certificate rotated, and a device revoked while the others stay connected."""

from __future__ import annotations

import json
import queue
import subprocess
import time
from pathlib import Path
from typing import Any

from edgebento.demo_runner import BIN, Demo, console
from edgebento.localservices import LOOPBACK, Mosquitto

DEVICES = ("id-1", "id-2", "id-3")
VALIDITY = "45s"  # renewed at two thirds: a rotation within the step
PREFIX = "edgebento"


def _operator(ca: Path, ids: Path, port: int) -> tuple[Any, queue.Queue[Any]]:
    import paho.mqtt.client as mqtt

    from cloud_sync.fleet_ca import tls_context

    seen: queue.Queue[Any] = queue.Queue()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="operator", protocol=mqtt.MQTTv5
    )
    client.tls_set_context(
        tls_context(ca / "ca-bundle.pem", ids / "operator.crt", ids / "operator.key")
    )
    client.on_message = lambda _c, _u, msg: seen.put(msg)
    client.connect(LOOPBACK, port, 30)
    client.loop_start()
    client.subscribe(f"{PREFIX}/+/status", 1)
    for device in DEVICES:
        client.subscribe(f"{PREFIX}/{device}/cmd/#", 1)
    return client, seen


def _states(seen: queue.Queue[Any], states: dict[str, str]) -> dict[str, str]:
    while not seen.empty():
        msg = seen.get()
        if msg.topic.endswith("/status") and msg.payload:
            states[msg.topic.split("/")[1]] = json.loads(msg.payload).get("state", "?")
    return states


def _until(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.3)


def step_identity(demo: Demo, keys: Path) -> str:
    from cloud_sync.broker_config import BrokerTls

    work = demo.workdir / "identity"
    ca, ids, store = work / "ca", work / "ids", work / "store"
    edgebento = BIN / "edgebento"
    demo.run(edgebento, "fleet", "ca", "init", "--out", ca)
    for name in ("enroll", "claim", "operator", "intruder"):
        demo.run(
            edgebento, "fleet", "ca", "issue", "--out", ca, "--name", name, "--to", ids, quiet=True
        )
    demo.run(
        edgebento, "fleet", "ca", "issue", "--out", ca, "--name", "broker", "--to", ids,
        "--host", LOOPBACK, quiet=True,
    )  # fmt: skip
    tls = BrokerTls(ca / "ca-bundle.pem", ids / "broker.crt", ids / "broker.key", ca / "crl.pem")
    broker = Mosquitto(workdir=work / "mosquitto", tls=tls, prefix=PREFIX).start()
    demo.stoppers.append(broker.stop)
    console.print(
        f"Mosquitto with mTLS on {broker.url} (claims on {broker.claim_url}); "
        f"ACL: deploy/mosquitto/acl + enrollment ({broker.workdir / 'acl'})"
    )
    assert broker.process is not None
    demo.start(
        "enroll-service", edgebento, "fleet", "enroll-service", "--broker", broker.url,
        "--ca", ca, "--cert", ids / "enroll.crt", "--key", ids / "enroll.key", "--store", store,
        "--validity", VALIDITY, "--crl-file", ca / "crl.pem", "--broker-pid", str(broker.process.pid),
    )  # fmt: skip
    claimed = demo.run(
        edgebento, "fleet", "claim", "--devices", ",".join(DEVICES), "--ttl", "1h",
        "--store", store, quiet=True,
    )  # fmt: skip
    tokens = json.loads(claimed.stdout)["claims"]
    console.print(f"{len(tokens)} one-time claim tokens (the store keeps their hashes only)")
    operator, seen = _operator(ca, ids, broker.port)
    states: dict[str, str] = {}
    try:
        for device in DEVICES:
            # A token in a file (0600), not on the command line, where ps would show it.
            token_file = work / "tokens" / device
            token_file.parent.mkdir(parents=True, exist_ok=True)
            token_file.write_text(tokens[device])
            token_file.chmod(0o600)
            demo.start(
                f"agent-{device}", BIN / "edge-agent", "run", "--device", device,
                "--broker", broker.url, "--data-dir", work / "devices" / device,
                "--trust", keys / "signing.pub", "--ca-file", ca / "ca-bundle.pem",
                "--claim-broker", broker.claim_url, "--claim-cert", ids / "claim.crt",
                "--claim-key", ids / "claim.key", "--enroll-file", token_file,
            )  # fmt: skip
        _until(
            lambda: all(_states(seen, states).get(d) == "online" for d in DEVICES),
            "enrollment of every device",
            90,
        )
        # A device of the fleet (its own certificate, CN id-9) tries to speak for id-2.
        forged = subprocess.run(
            ["mosquitto_pub", "-h", LOOPBACK, "-p", str(broker.port), "-V", "mqttv5",
             "--cafile", str(ca / "ca-bundle.pem"), "--cert", str(ids / "intruder.crt"),
             "--key", str(ids / "intruder.key"), "-q", "1", "-t", f"{PREFIX}/id-2/cmd/restart",
             "-m", '{"id": "forged"}'],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        time.sleep(1.0)
        reached = [m.topic for m in list(seen.queue) if "/cmd/" in m.topic]
        if reached:
            raise RuntimeError(f"a forged command reached a subscriber: {reached}")
        console.print(
            f"intruder's publish on {PREFIX}/id-2/cmd/restart (exit {forged.returncode}): "
            "nothing reached any subscriber"
        )

        from cloud_sync.identity_store import IdentityStore
        from cloud_sync.store import open_store

        records = IdentityStore(open_store(str(store)))

        def rotated() -> bool:
            record = records.device("id-1")
            return record is not None and record.last_rotation is not None

        _until(rotated, "the rotation of id-1's certificate", 90)
        demo.run(edgebento, "fleet", "identity", "--store", store)
        demo.run(
            edgebento, "fleet", "revoke", "id-3", "--store", store, "--ca", ca,
            "--crl-file", ca / "crl.pem", "--broker-pid", str(broker.process.pid),
            "--broker", broker.url,
        )  # fmt: skip
        _until(lambda: _states(seen, states).get("id-3") == "offline", "id-3 dropped", 15)
        if any(states.get(d) != "online" for d in ("id-1", "id-2")):
            raise RuntimeError(f"another device was dropped: {states}")
    finally:
        operator.disconnect()
        operator.loop_stop()
    return (
        "3 devices enrolled by claim over mTLS; a forged command on another device's topic "
        "reached nobody; id-1's certificate rotated; id-3 revoked and dropped, id-1 and id-2 "
        "stayed online"
    )
